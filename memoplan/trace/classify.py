"""Classify a traced layer: sequence axes, token-wise vs token-mixing ops, saved tensors.

Sequence axes come from comparing the same graph traced at several lengths: a dimension that
changes with the length is a token axis. Whether an op is token-wise is tested on its real
inputs (a probe): perturb token t of every input that has one token axis, run the op again,
and check that only token t of its output changed (t = first, middle and last token, so causal
and anti-causal mixing both show). The comparison is exact, against the op run on unperturbed
copies laid out as the perturbed ones are (a CPU kernel may round differently on a strided view
than on a contiguous copy, which is no mixing). Ops on values with two token axes (attention
scores), ops that reduce the token axis away, ops that make a token axis from no token input
(``arange(S)``: their values depend on where the tokens are) and ops whose probe fails are
token-mixing. ``getitem`` of a multi-output op shares its op's class.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import networkx as nx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from memoplan.errors import MemoplanError
from memoplan.trace.graph import LayerTrace, shadow_call

NodeClass = Literal["token", "mixing", "free"]


def tensors_of(value: Any) -> list[torch.Tensor | None]:
    """A node value's outputs as a list (None for non-tensor entries)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v if isinstance(v, torch.Tensor) else None for v in value]
    return []


def check_aligned(traces: Sequence[LayerTrace]) -> None:
    """All traces must be the same graph (same ops in the same order) at different lengths."""
    ref = traces[0]
    for tr in traces[1:]:
        a = [(n.op, str(n.target)) for n in ref.gm.graph.nodes]
        b = [(n.op, str(n.target)) for n in tr.gm.graph.nodes]
        if a != b or len(ref.forward_nodes) != len(tr.forward_nodes):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise MemoplanError(
                f"The layer's graph changes with the sequence length (at {ref.seq_len} and "
                f"{tr.seq_len} tokens it differs from op #{first} on), so sizes cannot be fitted "
                f"as laws of the length. Typical cause: Python branches on the sequence length "
                f"inside the layer. Profile at a --seq where the layer takes one path."
            )


def seq_axes(traces: Sequence[LayerTrace]) -> dict[str, list[tuple[int, ...]]]:
    """Node name -> for each tensor output, the axes whose size changes with the length."""
    out: dict[str, list[tuple[int, ...]]] = {}
    for n in traces[0].gm.graph.nodes:
        per_trace = [tensors_of(tr.values.get(n.name)) for tr in traces]
        axes: list[tuple[int, ...]] = []
        for i, t0 in enumerate(per_trace[0]):
            if t0 is None:
                axes.append(())
                continue
            shapes = [tuple(p[i].shape) for p in per_trace]
            if len({len(s) for s in shapes}) != 1:
                raise MemoplanError(f"Node '{n.name}' changes rank with the sequence length; "
                                    f"memoplan cannot find its token axis.")
            axes.append(tuple(d for d in range(len(shapes[0]))
                              if len({s[d] for s in shapes}) > 1))
        out[n.name] = axes
    return out


def _input_nodes(n: fx.Node) -> list[fx.Node]:
    return [a for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node)]


def _axes_of_arg(arg: fx.Node, axes: dict[str, list[tuple[int, ...]]]) -> tuple[int, ...] | None:
    entries = axes.get(arg.name, [])
    return entries[0] if len(entries) == 1 else None


def classify_forward(trace: LayerTrace, axes: dict[str, list[tuple[int, ...]]]
                     ) -> dict[str, NodeClass]:
    """Class of every forward call node: token-wise, token-mixing, or token-free."""
    classes: dict[str, NodeClass] = {}
    for n in trace.forward_nodes:
        if n.target is operator.getitem:
            parent = n.args[0]
            classes[n.name] = classes.get(parent.name, "free") if isinstance(parent, fx.Node) else "free"
            continue
        in_axes = [a for arg in _input_nodes(n) for a in axes.get(arg.name, [])]
        out_axes = axes.get(n.name, [])
        has_in = any(len(a) >= 1 for a in in_axes)
        has_out = any(len(a) >= 1 for a in out_axes)
        if _never_recomputed(n):
            classes[n.name] = "mixing"
        elif not has_in and not has_out:
            classes[n.name] = "free"
        elif any(len(a) >= 2 for a in in_axes + out_axes) or (has_in != has_out):
            # two token axes (scores), a reduction over tokens, or a value that grows with the
            # length out of nothing (arange(S) positions): never recomputed for a token subset
            classes[n.name] = "mixing"
        else:
            classes[n.name] = "token" if _probe_token_wise(n, trace, axes) else "mixing"
    return classes


def _never_recomputed(n: fx.Node) -> bool:
    """Ops classed as mixing whatever a probe says: a random op (dropout's ``bernoulli``, a
    flash kernel's seed) would draw again when recomputed, and a grouped matmul (``offs``: MoE
    experts) splits its rows into groups by absolute position, so a token subset would fall
    into the wrong groups although each row's probe looks token-wise."""
    tags = getattr(n.target, "tags", ())
    schema = getattr(n.target, "_schema", None)
    return (torch.Tag.nondeterministic_seeded in tags
            or (schema is not None and any(a.name == "offs" for a in schema.arguments)))


def _overlaps(x: torch.Tensor) -> bool:
    """True unless ``x``'s strides surely give every element its own memory (an expanded view,
    stride 0, is the usual overlap). Dims sorted by stride, each must step past the extent of
    the smaller ones."""
    extent = 1
    dims = sorted((d for d in zip(x.shape, x.stride()) if d[0] > 1), key=lambda d: d[1])
    for size, stride in dims:
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def _copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` laid out as ``x`` is: a copy of its whole storage, viewed with ``x``'s
    size, strides and storage offset, so an op on it takes the kernel path it took on ``x``
    (``clone`` makes a gapped view such as ``chunk``'s halves contiguous). A view whose elements
    share memory is copied contiguous instead, so that one token can be changed alone."""
    if x.layout != torch.strided or _overlaps(x):
        return x.clone(memory_format=torch.contiguous_format)
    storage = x.untyped_storage().clone()
    return x.new_empty(0).set_(storage, x.storage_offset(), x.size(), x.stride())


def _perturb(x: torch.Tensor, axis: int, t: int) -> torch.Tensor:
    y = _copy(x)
    sl = y.select(axis, t)
    if y.dtype == torch.bool:
        sl.logical_not_()
    elif y.is_floating_point() or y.is_complex():
        sl.add_(0.5 + sl.abs())
    else:  # integer tokens/positions: take a neighbour's value, which stays a valid index
        sl.copy_(x.select(axis, (t + 1) % x.shape[axis]))
        if torch.equal(sl, x.select(axis, t)):
            sl.add_(1)
    return y


def _probe_token_wise(n: fx.Node, trace: LayerTrace, axes: dict[str, list[tuple[int, ...]]]) -> bool:
    env = trace.real
    schema = getattr(n.target, "_schema", None)
    writes = schema is None or schema.is_mutable

    def run(t: int | None) -> list[torch.Tensor | None]:
        """The op on copies of its real inputs laid out as they are, token t perturbed (None:
        nothing perturbed). Baseline and probes see the same layouts, so they compare exactly.
        An input without one token axis (a weight) is never perturbed: an op that writes
        nothing takes it as it is, in the baseline and in every probe alike."""
        def load(a: fx.Node) -> Any:
            v = env[a.name]
            if not isinstance(v, torch.Tensor):
                return v
            ax = _axes_of_arg(a, axes)
            if ax is None or len(ax) != 1:
                return _copy(v) if writes else v
            return _perturb(v, ax[0], t) if t is not None else _copy(v)
        return tensors_of(shadow_call(n, load, trace.values))

    out_axes = axes[n.name]
    try:
        base_out = run(None)
    except Exception:
        return False  # an op that fails on copies of its own inputs: kept whole, never recomputed
    seq = next(t.shape[a[0]] for t, a in zip(base_out, out_axes) if t is not None and len(a) == 1)
    for t in sorted({0, seq // 2, seq - 1}):
        try:
            new_out = run(t)
        except Exception:
            return False  # a probe the op rejects: treat as mixing (kept whole, never recomputed)
        for old, new, ax in zip(base_out, new_out, out_axes):
            if old is None or new is None or len(ax) != 1 or old.shape != new.shape:
                continue
            changed = ~((old == new) | (old.isnan() & new.isnan())) if old.is_floating_point() \
                else old != new
            dims = [d for d in range(changed.dim()) if d != ax[0]]
            rows = changed.any(dim=dims) if dims else changed
            others = rows.clone()
            if t < others.numel():
                others[t] = False
            if bool(others.any()):
                return False
    return True


@dataclass(frozen=True, kw_only=True)
class SegmentInfo:
    id: int
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def token_segments(trace: LayerTrace, classes: dict[str, NodeClass]) -> tuple[list[SegmentInfo], dict[str, int]]:
    """Maximal connected regions of token-wise forward nodes (token-free nodes join the segment
    of their first token-wise user). Returns the segments and node name -> segment id."""
    fwd = {n.name: n for n in trace.forward_nodes}
    g = nx.Graph()
    token_nodes = [n for n in trace.forward_nodes if classes[n.name] == "token"]
    g.add_nodes_from(n.name for n in token_nodes)
    for n in token_nodes:
        for a in _input_nodes(n):
            if classes.get(a.name) == "token":
                g.add_edge(a.name, n.name)
    order = {n.name: i for i, n in enumerate(trace.forward_nodes)}
    comps = sorted((sorted(c, key=order.__getitem__) for c in nx.connected_components(g)),
                   key=lambda c: order[c[0]])
    member: dict[str, int] = {name: i for i, c in enumerate(comps) for name in c}
    for n in trace.forward_nodes:  # attach token-free helpers (weight transposes, constants)
        if classes[n.name] == "free":
            users = sorted((u for u in n.users if u.name in member), key=lambda u: order[u.name])
            if users:
                member[n.name] = member[users[0].name]
    position = {n.name: i for i, n in enumerate(trace.gm.graph.nodes)}  # placeholders first
    segments = []
    for i in range(len(comps)):
        names = [n for n in fwd if member.get(n) == i]
        inside = set(names)
        ins = sorted({a.name for nm in names for a in _input_nodes(fwd[nm]) if a.name not in inside},
                     key=position.__getitem__)
        outs = [nm for nm in names if any(u.name not in inside for u in fwd[nm].users)]
        segments.append(SegmentInfo(id=i, nodes=tuple(names), inputs=tuple(ins), outputs=tuple(outs)))
    return segments, member


@dataclass(frozen=True, kw_only=True)
class SavedStorage:
    """A storage saved for backward, with the node that created it."""

    creator: fx.Node
    nodes: tuple[fx.Node, ...]          # forward nodes on this storage that backward reads
    kind: str
    token_wise: bool
    nbytes: int
    autograd_saved: bool = True         # False: kept only as the source of recomputation


def saved_storages(trace: LayerTrace, classes: dict[str, NodeClass]) -> list[SavedStorage]:
    """Storages of forward values that backward nodes read (parameters and buffers excluded).

    The layer input is always included (kind ``input``): it is the source every token-wise
    recomputation starts from, so it is kept even where autograd itself does not save it (a
    bf16 layer whose norm saves an fp32 copy of its input instead); ``autograd_saved`` says
    which it was.
    """
    fwd_names = {n.name for n in trace.forward_nodes}
    placeholders = [n for n in trace.gm.graph.nodes if n.op == "placeholder"]
    state_ptrs = {trace.storage(p.name)[0] for p in placeholders
                  if trace.roles[p.name] in ("param", "buffer") and trace.storage(p.name)}
    input_kind = {trace.storage(p.name)[0]: ("input" if trace.roles[p.name] == "primary" else "shared")
                  for p in placeholders
                  if trace.roles[p.name] in ("primary", "shared") and trace.storage(p.name)}
    creators = {trace.storage(c.name)[0]: c for c in trace.creators().values()}
    read: dict[int, list[fx.Node]] = {}
    for b in trace.backward_nodes:
        for a in _input_nodes(b):
            if a.name in fwd_names or a.op == "placeholder":
                st = trace.storage(a.name)
                if st and st[0] not in state_ptrs and trace.roles.get(a.name) != "grad_out":
                    if a not in read.setdefault(st[0], []):
                        read[st[0]].append(a)
    order = {n.name: i for i, n in enumerate(trace.gm.graph.nodes)}
    kinds = {}
    for ptr in read:
        c = creators[ptr]
        kinds[ptr] = input_kind.get(ptr) or ("mixing_output" if classes.get(c.name) == "mixing"
                                             else "other")
    # what is kept whole (inputs, mixing outputs, and saved tensors that cannot be rebuilt by
    # token, such as a dropout mask) is where rebuilding the others may start: grow the
    # token-wise set until it stops changing (it only grows as more is kept)
    mutated = _mutated_storages(trace)
    base = {creators[p].name for p, k in kinds.items() if k != "other"}
    token_wise: set[int] = set()
    while True:
        kept = base | {creators[p].name for p in read if p not in token_wise}
        now = {p for p in read if kinds[p] == "other" and p not in mutated
               and _recomputable(creators[p], classes, kept, trace.roles)}
        if now == token_wise:
            break
        token_wise = now
    primary = next(p for p in placeholders if trace.roles[p.name] == "primary")
    primary_ptr = trace.storage(primary.name)[0]
    out = []
    if primary_ptr not in read:
        out.append(SavedStorage(creator=primary, nodes=(), kind="input", token_wise=False,
                                nbytes=trace.storage(primary.name)[1], autograd_saved=False))
    for ptr in sorted(read, key=lambda p: order[creators[p].name]):
        c = creators[ptr]
        out.append(SavedStorage(creator=c, nodes=tuple(read[ptr]), kind=kinds[ptr],
                                token_wise=ptr in token_wise,
                                nbytes=trace.storage(c.name)[1]))
    return out


def _mutated_storages(trace: LayerTrace) -> set[int]:
    ptrs = set()
    for n in trace.forward_nodes:
        schema = getattr(n.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            for a in _input_nodes(n):
                st = trace.storage(a.name)
                if st:
                    ptrs.add(st[0])
    return ptrs


def _recomputable(node: fx.Node, classes: dict[str, NodeClass], kept: set[str],
                  roles: dict[str, str]) -> bool:
    """Can ``node`` be rebuilt for any token subset from kept values through token-wise ops?"""
    if classes.get(node.name) != "token":
        return False
    seen: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        for a in _input_nodes(n):
            if a.op == "placeholder":
                if roles.get(a.name) == "grad_out":
                    return False
                continue
            if a.name in kept:
                continue
            if classes.get(a.name) in ("token", "free"):
                stack.append(a)
            else:
                return False
    return True
