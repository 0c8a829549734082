"""The allocation requests of one layer's forward and of its backward.

Each new storage a node produces is one ``malloc``; it is freed right after its last reader in
the same phase, except skeletal storages (read by backward: freed after their last backward
reader), the layer's outputs (handed to the next layer) and the gradients backward returns
(never freed inside the layer). Views share their base's storage and allocate nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from memoplan.trace.graph import LayerTrace

Request = tuple[str, int, int]


@dataclass(frozen=True, kw_only=True)
class Storage:
    id: int
    name: str          # the fx node that created it
    phase: str         # "forward" | "backward"
    role: str          # "transient" | "skeletal" | "output" | "grad"
    nbytes: int


def _readers(n: fx.Node) -> list[fx.Node]:
    return [a for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node)]


def _made_by(trace: LayerTrace, n: fx.Node) -> list[tuple[str, tuple[int, int]]]:
    """(name, storage) of every tensor ``n`` returns. A multi-output op allocates all its
    outputs when it runs, also those no ``getitem`` reads (the graph drops those getitems);
    each is named after the getitem that reads it, if any."""
    st = trace.storage(n.name)
    if st:
        return [(n.name, st)]
    value = trace.values.get(n.name)
    if not isinstance(value, (tuple, list)):
        return []
    readers = {u.args[1]: u.name for u in n.users
               if u.target is operator.getitem and isinstance(u.args[1], int)}
    out = []
    for k, v in enumerate(value):
        if isinstance(v, torch.Tensor) and v.layout == torch.strided \
                and v.untyped_storage().nbytes() > 0:
            out.append((readers.get(k, f"{n.name}[{k}]"),
                        (StorageWeakRef(v.untyped_storage()).cdata, v.untyped_storage().nbytes())))
    return out


def allocation_requests(trace: LayerTrace) -> tuple[list[Storage], list[Request], list[Request]]:
    """Storages of the layer (in creation order) and the forward and backward request lists."""
    outputs_node = next(n for n in trace.gm.graph.nodes if n.op == "output")
    flat = pytree.tree_leaves(outputs_node.args[0])
    outs, grads = flat[: trace.num_outputs], flat[trace.num_outputs:]
    out_ptrs = {trace.storage(n.name)[0] for n in pytree.tree_leaves(outs)
                if isinstance(n, fx.Node) and trace.storage(n.name)}
    grad_ptrs = {trace.storage(n.name)[0] for n in pytree.tree_leaves(grads)
                 if isinstance(n, fx.Node) and trace.storage(n.name)}
    given = {trace.storage(n.name)[0] for n in trace.gm.graph.nodes
             if n.op == "placeholder" and trace.storage(n.name)}

    steps = [("forward", n) for n in trace.forward_nodes] + [("backward", n) for n in trace.backward_nodes]
    created: dict[int, tuple[int, str, str, int]] = {}   # ptr -> (step, phase, name, bytes)
    last_read: dict[tuple[int, str], int] = {}           # (ptr, phase) -> step
    for i, (phase, n) in enumerate(steps):
        for name, st in _made_by(trace, n):
            if st[0] not in given and st[0] not in created:
                created[st[0]] = (i, phase, name, st[1])
        for a in _readers(n):
            sa = trace.storage(a.name)
            if sa and sa[0] in created:
                last_read[(sa[0], phase)] = i

    storages: list[Storage] = []
    sid: dict[int, int] = {}
    for ptr, (step, phase, name, nbytes) in sorted(created.items(), key=lambda kv: kv[1][0]):
        if ptr in out_ptrs and phase == "forward":
            role = "output"
        elif ptr in grad_ptrs and phase == "backward":
            role = "grad"
        elif phase == "forward" and (ptr, "backward") in last_read:
            role = "skeletal"
        else:
            role = "transient"
        sid[ptr] = len(storages)
        storages.append(Storage(id=sid[ptr], name=name, phase=phase, role=role, nbytes=nbytes))

    fwd: list[Request] = []
    bwd: list[Request] = []
    frees: dict[int, list[int]] = {}
    for ptr, (step, phase, _, _) in created.items():
        role = storages[sid[ptr]].role
        if role == "transient":
            frees.setdefault(max(step, last_read.get((ptr, phase), step)), []).append(ptr)
        elif role == "skeletal":
            frees.setdefault(last_read[(ptr, "backward")], []).append(ptr)
    by_step: dict[int, list[int]] = {}
    for ptr, (step, *_rest) in created.items():
        by_step.setdefault(step, []).append(ptr)
    for i, (phase, _) in enumerate(steps):
        reqs = fwd if phase == "forward" else bwd
        for ptr in by_step.get(i, []):
            reqs.append(("malloc", sid[ptr], created[ptr][3]))
        for ptr in frees.get(i, []):
            reqs.append(("free", sid[ptr], created[ptr][3]))
    return storages, fwd, bwd


def peak_live_bytes(requests: list[Request], live_at_start: int = 0) -> int:
    """Largest total of live bytes over a request list."""
    live = peak = live_at_start
    for op, _, nbytes in requests:
        live += nbytes if op == "malloc" else -nbytes
        peak = max(peak, live)
    return peak
