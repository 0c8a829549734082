"""A layer's program: its traced forward/backward graph and what happens to each saved tensor.

Built once per input signature (shapes, dtypes, devices, autocast state) when a wrapped layer is
first called. The layer is traced again here, on the device it runs on, and its forward graph
must match the profiled one op for op (``plan.layer.nodes``): the token axes and token-wise
classes of the profile then apply, and a layer that changed, or a device whose kernels differ
from the profiled ones, is refused with a message instead of executed wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from memoplan.errors import MemoplanError
from memoplan.ir import RuntimeLayer
from memoplan.trace.graph import LayerTrace, release_after, trace_layer


class _Output:
    def __repr__(self) -> str:
        return "OUTPUT"


OUTPUT = _Output()  # in LayerProgram.out_template: a tensor the program computes (None is data)


@dataclass(frozen=True, kw_only=True)
class Handling:
    """How one saved storage (named by the fx node that creates it) is treated.

    ``how``: ``whole`` (copied to host whole), ``split`` (alpha of its tokens copied, the rest
    recomputed; ``axis`` is its token axis), ``state`` (a parameter or buffer: nothing to do),
    ``shared`` (a shared layer argument: kept by reference).
    """

    creator: str
    how: str
    axis: int | None = None


@dataclass(kw_only=True)
class LayerProgram:
    trace: LayerTrace
    placeholders: list[fx.Node]
    roles: dict[str, str]
    read_by_backward: list[str]            # forward/placeholder names that backward reads
    creator_of: dict[str, str]             # name -> name of the node that made its storage
    handling: dict[str, Handling]          # creator name -> handling
    classes: dict[str, str]
    axes: dict[str, list[tuple[int, ...]]]
    num_outputs: int
    out_spec: Any                          # pytree spec of the layer's own return value
    out_template: list[Any]                # its leaves: OUTPUT, PassedThrough, or data
    grad_input_pos: list[int]              # indices (into the flat tensor inputs) needing grad
    input_grad_names: list[str] = field(default_factory=list)  # backward outputs: input grads
    node: dict[str, fx.Node] = field(default_factory=dict)
    recompute_order: dict[str, list[str]] = field(default_factory=dict)
    whole_instead: list[str] = field(default_factory=list)  # token-wise, but not at this shape
    random: bool = False                   # the forward draws random numbers (dropout)
    ring: Any = None                       # runtime.ring.RingAttention under context parallelism
    # node name -> values to drop once it has run (each value right after its last use)
    drop_forward: dict[str, list[str]] = field(default_factory=dict)
    drop_refold: dict[str, list[str]] = field(default_factory=dict)   # forward re-run in backward
    drop_backward: dict[str, list[str]] = field(default_factory=dict)
    _rebuilds: dict[frozenset, tuple[list[fx.Node], dict[str, list[str]]]] = field(
        default_factory=dict)  # see rebuild()

    def rebuild(self, creators: frozenset[str]) -> tuple[list[fx.Node], dict[str, list[str]]]:
        """The ops that rebuild ``creators`` together, each run once, in graph order (their
        ancestries overlap: rebuilding each tensor alone would re-run the shared matmuls), and
        when to drop each value they make or read."""
        if creators not in self._rebuilds:
            names = set().union(*(self.recompute_order[c] for c in creators))
            nodes = [n for n in self.trace.gm.graph.nodes if n.name in names]
            self._rebuilds[creators] = nodes, release_after(nodes, set())
        return self._rebuilds[creators]

    @property
    def forward_nodes(self) -> list[fx.Node]:
        return self.trace.forward_nodes

    @property
    def backward_nodes(self) -> list[fx.Node]:
        return self.trace.backward_nodes


def build_program(layer: torch.nn.Module, args: tuple, kwargs: dict, plan_layer: RuntimeLayer,
                  layer_name: str) -> LayerProgram:
    """Trace ``layer`` on these arguments and match it against the plan's profiled graph."""
    tr = trace_layer(layer, args, kwargs, seq_len=-1, layer_name=layer_name, real=False)
    _check_same_graph(tr, plan_layer, layer_name)
    nodes = {n["name"]: n for n in plan_layer.nodes}
    classes = {name: n["class"] for name, n in nodes.items()}
    axes = {name: [tuple(a) for a in n["axes"]] for name, n in nodes.items()}
    placeholders = [n for n in tr.gm.graph.nodes if n.op == "placeholder"]
    fwd = {n.name for n in tr.forward_nodes} | {p.name for p in placeholders}
    read = []
    for b in tr.backward_nodes:
        for a in pytree.tree_leaves((b.args, b.kwargs)):
            if isinstance(a, fx.Node) and a.name in fwd and tr.roles.get(a.name) != "grad_out" \
                    and a.name not in read:
                read.append(a.name)
    creator_of = {name: c.name for name, c in tr.creators().items()}
    saved = {t.name: t for t in plan_layer.saved}
    handling: dict[str, Handling] = {}
    for name in read:
        c = creator_of.get(name, name)
        role = tr.roles.get(c)
        if role in ("param", "buffer"):
            handling[c] = Handling(creator=c, how="state")
        elif role == "shared":
            handling[c] = Handling(creator=c, how="shared")
        elif c in saved and saved[c].kind == "other" and saved[c].token_wise \
                and saved[c].seq_axis is not None:
            handling[c] = Handling(creator=c, how="split", axis=saved[c].seq_axis)
        else:
            handling[c] = Handling(creator=c, how="whole")
    primary = next(p.name for p in placeholders if tr.roles[p.name] == "primary")
    handling.setdefault(primary, Handling(creator=primary, how="whole"))
    output, fake_leaves = _layer_output(layer, args, kwargs)
    out_leaves, out_spec = pytree.tree_flatten(output)
    template = [_template_entry(x, k, fake_leaves, layer_name) for k, x in enumerate(out_leaves)]
    if sum(x is OUTPUT for x in template) != tr.num_outputs:
        raise MemoplanError(f"Layer '{layer_name}' returns tensors memoplan cannot map to its "
                            f"traced outputs.")
    tensor_inputs = [p for p in placeholders if tr.roles[p.name] in ("primary", "shared")]
    grad_pos = [i for i, p in enumerate(tensor_inputs) if _requires_grad(tr, p.name)]
    prog = LayerProgram(trace=tr, placeholders=placeholders, roles=tr.roles, read_by_backward=read,
                        creator_of=creator_of, handling=handling, classes=classes, axes=axes,
                        num_outputs=tr.num_outputs, out_spec=out_spec, out_template=template,
                        grad_input_pos=grad_pos,
                        node={n.name: n for n in tr.gm.graph.nodes})
    _order_recomputation(prog)
    prog.random = any(torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())
                      for n in tr.forward_nodes)
    out = pytree.tree_leaves(next(n for n in tr.gm.graph.nodes if n.op == "output").args[0])
    prog.input_grad_names = [n.name for n in out[tr.num_outputs:tr.num_outputs + len(grad_pos)]
                             if isinstance(n, fx.Node)]
    names = {p.name for p in placeholders}
    prog.drop_forward = release_after(
        tr.forward_nodes, names | set(handling) | {n.name for n in out[:tr.num_outputs]})
    prog.drop_refold = release_after(tr.forward_nodes, names | set(handling) | set(read))
    prog.drop_backward = release_after(
        tr.backward_nodes, {n.name for n in out[tr.num_outputs:] if isinstance(n, fx.Node)})
    return prog


def _requires_grad(tr: LayerTrace, name: str) -> bool:
    v = tr.values.get(name)
    return isinstance(v, torch.Tensor) and v.requires_grad


@dataclass(frozen=True)
class PassedThrough:
    """In ``LayerProgram.out_template``: the layer returns its argument ``index`` (a leaf of
    the call's ``(args, kwargs)``) as it is, such as T5's attention bias from block to block."""

    index: int


def _template_entry(x: Any, k: int, inputs: list[Any], layer_name: str) -> Any:
    """What output leaf ``x`` (of the fake run) becomes in the template: OUTPUT (computed by the
    program), PassedThrough (an argument returned as is), or itself (non-tensor data)."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.requires_grad:
        return OUTPUT
    j = next((j for j, a in enumerate(inputs) if a is x), None)
    if j is None:
        raise MemoplanError(
            f"Layer '{layer_name}' returns a tensor that needs no gradient and is none of its "
            f"arguments (output #{k}, shape {tuple(x.shape)}); memoplan runs only the outputs "
            f"that carry gradients. Compute it outside the layer, or pass another class with "
            f"--layer.")
    return PassedThrough(j)


def _layer_output(layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[Any, list[Any]]:
    """The layer's return value on fake copies of its arguments (for its structure only), and
    the leaves of those arguments."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.enable_grad():
        fa, fk = pytree.tree_map_only(
            torch.Tensor, lambda t: mode.from_tensor(t.detach()).requires_grad_(t.requires_grad),
            (args, kwargs))
        hidden = next((t for t in pytree.tree_leaves((fa, fk))
                       if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2), None)
        if hidden is not None and not hidden.requires_grad:
            hidden.requires_grad_()
        return layer.forward(*fa, **fk), pytree.tree_leaves((fa, fk))  # no hooks (FSDP2's)


def _check_same_graph(tr: LayerTrace, plan_layer: RuntimeLayer, layer_name: str) -> None:
    here = [(n.name, str(n.target)) for n in tr.forward_nodes]  # op for op, in order
    there = [(n["name"], n["target"]) for n in plan_layer.nodes if n["class"] != "placeholder"]
    if here == there:
        return
    k = next((i for i, (a, b) in enumerate(zip(here, there)) if a != b), min(len(here), len(there)))
    mine = here[k][1] if k < len(here) else "(end of graph)"
    theirs = there[k][1] if k < len(there) else "(end of graph)"
    raise MemoplanError(
        f"Layer '{layer_name}' traced here differs from the profiled layer at forward op #{k} "
        f"({mine} here, {theirs} in the profile). The plan was profiled on another device or "
        f"for another version of the layer: run 'memoplan profile' again on this device "
        f"(--device cuda on a GPU) and solve a new plan.")


def _order_recomputation(prog: LayerProgram) -> None:
    """The ops that rebuild each split tensor. A tensor whose rebuild would meet its token axis
    merged with another one at this call's shape (batch > 1 flattened into the token axis for a
    matmul: the profile, at batch 1, saw a token axis there) is copied whole instead."""
    changed = True
    while changed:
        changed = False
        for c, h in list(prog.handling.items()):
            if h.how == "split":
                order = _ancestry(prog, c)
                if _token_sizes_agree(prog, order, prog.trace.values[c].shape[h.axis]):
                    prog.recompute_order[c] = order
                else:
                    prog.handling[c] = Handling(creator=c, how="whole")
                    prog.whole_instead.append(c)
                    changed = True  # the others may now read it as a kept value
    prog.recompute_order = {c: o for c, o in prog.recompute_order.items()
                            if prog.handling[c].how == "split"}


def _token_sizes_agree(prog: LayerProgram, names: list[str], seq: int) -> bool:
    """Whether every value these ops make or read has ``seq`` entries at its token axis."""
    seen = set(names)
    for name in names:
        n = prog.node[name]
        seen |= {a.name for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node)}
    for name in seen:
        v, ax = prog.trace.values.get(name), prog.axes.get(name, [])
        if isinstance(v, torch.Tensor) and len(ax) == 1 and len(ax[0]) == 1 \
                and v.shape[ax[0][0]] != seq:
            return False
    return True


def _ancestry(prog: LayerProgram, creator: str) -> list[str]:
    """Forward nodes to re-run (in graph order) to rebuild ``creator`` from kept values."""
    kept = {c for c, h in prog.handling.items() if h.how != "split"}
    order = {n.name: i for i, n in enumerate(prog.trace.gm.graph.nodes)}
    need: set[str] = set()
    stack = [creator]
    while stack:
        name = stack.pop()
        if name in need:
            continue
        n = prog.node[name]
        if n.op == "placeholder" or (name in kept and name != creator):
            continue
        if prog.classes.get(name) not in ("token", "free"):
            raise MemoplanError(f"Internal: '{creator}' is marked token-wise but depends on "
                                f"'{name}' ({n.target}), which is not; profile the layer again.")
        need.add(name)
        stack += [a.name for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node)]
    return sorted(need, key=order.__getitem__)
