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
buffer (a real hazard: a replay would write it again), and a write into a tensor that is read
again afterwards through another alias (a view of it, or its base: the write would change
what that alias reads).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

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


def _storage(n: fx.Node) -> int | None:
    """The storage of ``n``'s traced (fake) value, as an id; None for non-tensors."""
    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor) or v.layout != torch.strided:
        return None
    return StorageWeakRef(v.untyped_storage()).cdata


def _with_defaults(n: fx.Node) -> tuple[tuple, dict]:
    """``n``'s arguments with every omitted one spelled out (make_fx leaves out arguments equal
    to their default, and the out-of-place op may have no default: ``bernoulli_``'s p=0.5)."""
    args, kwargs = list(n.args), dict(n.kwargs)
    for i, a in enumerate(n.target._schema.arguments):
        if i < len(n.args) or a.name in kwargs:
            continue
        if a.kwarg_only:
            kwargs[a.name] = a.default_value
        else:
            args.append(a.default_value)
    return tuple(args), kwargs


def _on_meta(op: Any) -> Any:
    """``op`` run on meta copies of its tensor arguments (for the result's dtype)."""
    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    def run(*args: Any, **kwargs: Any) -> Any:
        a, k = pytree.tree_map_only(torch.Tensor, meta, (args, kwargs))
        return op(*a, **k)
    return run


def functionalize_forward(gm: fx.GraphModule, forward_nodes: list[fx.Node],
                          inputs: dict[str, str], layer_name: str) -> int:
    """Rewrite the forward's in-place writes into the layer's own tensors out of place (nodes
    keep their names); raise a :class:`MemoplanError` for any other write (``inputs``: each
    placeholder as a message names it, "the buffer 'running_mean'"). Returns how many ops
    were rewritten.

    Aliasing is read from the traced values' storages (``meta["val"]``), so views that reach
    the graph as ``getitem`` of ``unbind``/``split`` count too. A node already rewritten owns a
    storage of its own from then on.
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    rewritten: set[fx.Node] = set()
    count = 0
    for n in list(forward_nodes):
        if not writes_in_place(n):
            continue
        target = _written(n)
        storage = _storage(target) if target is not None else None
        refusal = None
        if storage is None:
            refusal = "into an output argument ('out=')"
        else:
            before = [m for m in nodes[:order[n]] if _storage(m) == storage]
            owner = target if target in rewritten else before[0]
            if owner.op in ("placeholder", "get_attr"):
                refusal = (f"into {inputs.get(owner.name, 'a tensor the layer holds')}, which a "
                           f"replay of the layer would write again")
            elif any(order[u] > order[n] for m in before for u in m.users if u is not n):
                refusal = ("into a tensor that is read again afterwards through another alias "
                           "(a view of it, or the tensor it is a view of)")
        functional = out_of_place(n.target) if refusal is None else None
        if refusal is None and functional is None:
            refusal = "with an op that has no out-of-place variant"
        if refusal is not None:
            raise MemoplanError(
                f"Layer '{layer_name}' writes in place {refusal}: {where(n)}. memoplan replays a "
                f"layer's ops (recomputation, checkpointing), which would apply such a write "
                f"twice, so it cannot plan this layer. Make that write out of place "
                f"('h = h + x' instead of 'h += x'), or move it out of the layer.")
        args, kwargs = _with_defaults(n)
        n.target, n.args, n.kwargs = functional, args, kwargs
        rewritten.add(n)
        count += 1
        # an in-place op keeps its target's dtype where the out-of-place one may promote
        # (bf16 h += fp32 x): cast back, so values and sizes stay as traced
        vals = pytree.tree_map_only(fx.Node, lambda a: a.meta["val"], (args, kwargs))
        want = n.meta["val"].dtype
        try:
            got = _on_meta(functional)(*vals[0], **vals[1]).dtype
        except Exception:  # noqa: BLE001  (no meta kernel: the recorded run checks dtypes)
            got = want
        if got != want:
            with gm.graph.inserting_after(n):
                cast = gm.graph.create_node("call_function", torch.ops.aten._to_copy.default,
                                            (n,), {"dtype": want}, name=f"{n.name}_cast")
            n.replace_all_uses_with(cast, delete_user_cb=lambda u: u is not cast)
            cast.meta = dict(n.meta)
            order[cast] = order[n] + 0.5
            rewritten.add(cast)
            forward_nodes.insert(forward_nodes.index(n) + 1, cast)
    if count:
        gm.recompile()
    return count
