"""In-place writes in a layer's forward: rewritten out of place, or refused where they are a hazard.

memoplan replays a layer's forward ops (the runtime's forward, a checkpointed layer's re-run,
the ops that rebuild dropped tokens), so a write into a tensor that outlives one replay would
be applied twice. Most in-place ops in real layers write into a tensor the layer itself just
made: ``h += residual`` (Falcon), ``torch.rsqrt(var.add_(eps))``, a router's ``w /= w.sum()``,
dropout's ``empty_like(x).bernoulli_(p)`` and ``div_``. Those are rewritten to their
out-of-place variants (``add_`` -> ``add``, ``bernoulli_.float`` -> ``bernoulli.p``): the
trace records every later read of the written tensor as a read of the in-place op's result,
so the rewritten graph computes the same values, as ``torch.func.functionalize`` would, and
draws the same random numbers from the same generator.

What is left is refused, with the op's source line: a write into a layer input, parameter or
buffer (a real hazard: a replay would write it again), a write through a view (it changes the
view's base too), and a write into a tensor that is read again through another alias.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from memoplan.errors import MemoplanError
from memoplan.trace.replay import where


def _schema(n: fx.Node) -> torch.FunctionSchema | None:
    return getattr(n.target, "_schema", None) if n.op == "call_function" else None


def writes_in_place(n: fx.Node) -> bool:
    """Whether ``n``'s op writes into one of its arguments (``mul_``, ``copy_``, ``out=``)."""
    schema = _schema(n)
    return schema is not None and any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def is_view(n: fx.Node) -> bool:
    """Whether ``n``'s result aliases its first argument (``view``, ``slice``, ``transpose``)."""
    schema = _schema(n)
    return (schema is not None and not writes_in_place(n) and len(schema.returns) >= 1
            and schema.returns[0].alias_info is not None)


def out_of_place(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The out-of-place overload with the same arguments as in-place ``op`` (``add_.Tensor`` ->
    ``add.Tensor``, ``bernoulli_.float`` -> ``bernoulli.p``), or None."""
    name = op._opname
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(getattr(torch.ops, op.namespace), name[:-1], None)
    if packet is None:
        return None

    def key(schema: torch.FunctionSchema) -> list:
        return [(a.name, str(a.type), a.kwarg_only) for a in schema.arguments]

    want = key(op._schema)
    for overload in packet.overloads():
        candidate = getattr(packet, overload)
        s = candidate._schema
        if key(s) == want and not any(a.alias_info is not None for a in s.arguments):
            return candidate
    return None


def _written(n: fx.Node) -> fx.Node | None:
    """The argument node an in-place op writes into (None for a non-node or ``out=`` write)."""
    schema = _schema(n)
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            return v if isinstance(v, fx.Node) else None
    return None


def _base(n: fx.Node) -> fx.Node:
    while is_view(n) and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def functionalize_forward(gm: fx.GraphModule, forward_nodes: list[fx.Node],
                          inputs: dict[str, str], layer_name: str) -> int:
    """Rewrite the forward's in-place writes into the layer's own tensors out of place (nodes
    keep their names); raise a :class:`MemoplanError` for any other write (``inputs``: each
    placeholder as a message names it, "the buffer 'running_mean'"). Returns how many ops
    were rewritten."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    rewritten = 0
    for n in forward_nodes:
        if not writes_in_place(n):
            continue
        target = _written(n)
        base = _base(target) if target is not None else None
        refusal = None
        if target is None or base is None:
            refusal = "into an output argument ('out=')"
        elif base.op == "placeholder":
            refusal = (f"into {inputs.get(base.name, 'an input of the layer')}, which a replay "
                       f"of the layer would write again")
        elif base is not target:
            refusal = "through a view into another tensor"
        elif any(order[u] > order[n] for a in _aliases(target) for u in a.users if u is not n):
            refusal = "into a tensor that is read again afterwards through another name"
        functional = out_of_place(n.target) if refusal is None else None
        if refusal is None and functional is None:
            refusal = "with an op that has no out-of-place variant"
        if refusal is not None:
            raise MemoplanError(
                f"Layer '{layer_name}' writes in place {refusal}: {where(n)}. memoplan replays a "
                f"layer's ops (recomputation, checkpointing), which would apply such a write "
                f"twice, so it cannot plan this layer. Make that write out of place "
                f"('h = h + x' instead of 'h += x'), or move it out of the layer.")
        n.target = functional
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def _aliases(n: fx.Node) -> list[fx.Node]:
    """``n`` and the views taken of it (transitively)."""
    out, stack = [], [n]
    while stack:
        m = stack.pop()
        out.append(m)
        stack += [u for u in m.users if is_view(u) and u.args and u.args[0] is m]
    return out

