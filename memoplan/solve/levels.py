"""The bi-level address plan.

Level 1 places one layer's forward requests and, separately, its backward requests (every
identical layer reuses these offsets), at the per-rank shapes (``solve.swap``); with context
parallelism they include ring attention's buffers around each attention op (``ring:kv``,
``ring:merge``, ``ring:dkv``, ``ring:dq``: ``solve.parallel``). Skeletal tensors are not in
level 1: forward writes them into the layer's rounding buffer and backward reads them from its
prefetch buffer, both level-2 blocks. Level 2 places the whole iteration as blocks over phase
steps (``ir.Steps``)

    step 0: embedding | 1..L: forward of layer 0..L-1 | L+1: head and loss | then per layer
    L-1..0 two steps: its rebuild (dropped tokens recomputed) and its backward graph

with, per layer i: ``fwd[i]`` (level-1 forward peak, its forward step), ``hidden[i]`` for i > 0
(its input, the output of layer i-1, from the step that makes it until its copy is done during
forward i+1, or until backward i for layers kept or checkpointed), ``round[i]`` (its saved
tensors other than the input, a rounding buffer: until its copy is done during forward i+1, or
until backward i for kept layers), ``prefetch[i]`` (what comes back from the host during
backward i+1, until backward i ends: the tensors copied whole, and the full buffers of split
tensors whose tokens are not outermost in memory), ``split[i]:NAME`` for every other split
tensor (a growing block: its copied tokens from backward i+1 on, its recomputed tokens beside
them from backward i on, so while layer i+1 runs its backward layer i holds only what comes
back from the host; every second layer of a run copies its last tokens instead of its first,
and its block grows down: `_chains`), ``recompute[i]`` (the workspace for recomputing its
dropped tokens), ``bwd[i]`` (level-1 backward peak) and ``grad[i]`` (the gradient of its input,
until backward i-1 is done). A kept layer right above an offloaded one has its split tensors
in blocks of their own, ``kept[i]:NAME``, outside its rounding buffer.

The arena holds only what the runtime places there. The embedding's output (layer 0's input),
the logits and the loss are made by the model's own code outside the wrapped layers, so they
come from PyTorch's allocator beside the arena: the plan budgets them as ``pool_bytes``
(``pool_bytes``), not as arena blocks that would stay empty. Each level is solved by
``solve.mip_dsa`` (`place_level`), checked by the independent checker, and compared with
greedy-by-size and a simulation of PyTorch's caching allocator on the same blocks.

Level 2 starts from the best of greedy-by-size and three placements built from its structure
(`level2_starts`): the phases come in order, so the blocks that span the forward and the
backward are all live at the head step and nest (`phase_ordered`); each offloaded layer's
split tensors can sit whole above its prefetch block (`stacked_splits`); and each split tensor's
layers can interleave two by two, one growing up and the next down, so that a tensor needs
N + h bytes in the backward instead of 2N (`chained_splits`, with an order search in
`START_SHARE` of the time limit). Where the start meets the lower bound, no search and no MIP
run (the placement's ``note`` says so).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

from memoplan.ir import LayerDecision, LevelPlan, Profile, Steps
from memoplan.solve.caching_sim import simulate_caching_allocator
from memoplan.solve.check import check_placement
from memoplan.solve.config import SolveConfig
from memoplan.solve.dsa import (Block, Placement, blocks_from_requests, first_fit, hole_bound,
                                lower_bound, peak_of, search_orders, solve_greedy)
from memoplan.solve.mip_dsa import solve_mip
from memoplan.solve.parallel import fsdp_headroom, ring_requests
from memoplan.solve.swap import LayerBytes, aligned, per_gpu_bytes

Progress = Callable[[str], None]


def level1_requests(profile: Profile, cfg: SolveConfig,
                    phase: str) -> list[tuple[str, int | str, int]]:
    """One phase's requests at the per-rank shapes on one GPU, skeletal tensors left out, with
    ring attention's buffers (``ring:NAME``, ``solve.parallel``) around each attention op."""
    tensors = {t.id: t for t in profile.layer.tensors}
    reqs = profile.layer.requests_forward if phase == "forward" else profile.layer.requests_backward
    sized = [(op, tid, per_gpu_bytes(tensors[tid].law, cfg)) for op, tid, _ in reqs]
    return [r for r in ring_requests(profile, cfg, phase, sized)
            if isinstance(r[1], str) or tensors[r[1]].role != "skeletal"]


def blocks_to_requests(blocks: Sequence[Block]) -> list[tuple[str, int | str, int]]:
    """Blocks back to an ordered request trace (frees before mallocs at the same step)."""
    events = []
    for b in blocks:
        if b.is_trivial:
            continue
        # a caching allocator cannot grow a tensor in place: it holds the whole from the start
        events.append((b.start, 1, "malloc", b.id, b.top))
        events.append((b.end, 0, "free", b.id, b.top))
    events.sort(key=lambda e: (e[0], e[1]))
    return [(op, i, size) for _, _, op, i, size in events]


def place_level(blocks: list[Block], *, time_limit: float, unit: int, name: str = "level",
                progress: Progress = lambda m: None,
                starts: Sequence[Placement | None] = ()) -> Placement:
    """The solver's placement of ``blocks`` (none trivial): ``solve_mip`` from the best of
    greedy-by-size and ``starts``, checked. Its ``note`` says which stages ran and why."""
    progress(f"solving {name} ({len(blocks)} tensors)")
    start = min([solve_greedy(blocks)] + [s for s in starts if s is not None],
                key=lambda s: s.peak)  # the first (greedy) on ties
    placement = solve_mip(blocks, time_limit=time_limit, warm_start=start, unit=unit,
                          on_progress=lambda best, bound: progress(
                              f"solving {name}: best {best / 2**20:.1f} MiB, bound "
                              f"{bound / 2**20:.1f} MiB"))
    check_placement(blocks, placement)
    if placement.method == start.method and start.note:  # e.g. what a chained start chained
        placement = dataclasses.replace(placement, note=f"{placement.note} ({start.note})")
    progress(f"solved {name}: {placement.note}")
    return placement


def solve_level(blocks: list[Block], *, time_limit: float, unit: int, name: str,
                kinds: dict[str, str], progress: Progress,
                starts: Sequence[Placement | None] = ()) -> LevelPlan:
    """`place_level` of ``blocks`` with the baselines beside it."""
    live = [b for b in blocks if not b.is_trivial]
    greedy = solve_greedy(live)
    placement = place_level(live, time_limit=time_limit, unit=unit, name=name,
                            progress=progress, starts=starts)
    caching = simulate_caching_allocator(blocks_to_requests(live))
    offsets = {str(b.id): placement.offsets[b.id] for b in live}
    return LevelPlan(offsets=offsets, sizes={str(b.id): b.size for b in live},
                     lifetimes={str(b.id): (b.start, b.end) for b in live},
                     grows={str(b.id): (b.grow, b.grow_at) for b in live if b.grow},
                     grows_down=tuple(str(b.id) for b in live if b.grow and b.grows_down),
                     kinds={str(b.id): kinds.get(str(b.id), "transient") for b in live},
                     peak=placement.peak,
                     lower_bound=lower_bound(live), greedy_peak=greedy.peak,
                     caching_reserved_peak=caching.reserved_peak,
                     caching_allocated_peak=caching.allocated_peak, status=placement.status,
                     gap=placement.gap, seconds=placement.seconds, method=placement.method,
                     note=placement.note)


def level1(profile: Profile, cfg: SolveConfig, phase: str, progress: Progress) -> LevelPlan:
    blocks = blocks_from_requests(level1_requests(profile, cfg, phase))
    kinds = {str(t.id): t.role for t in profile.layer.tensors}
    kinds.update({str(b.id): "ring" for b in blocks if str(b.id).startswith("ring:")})
    return solve_level(blocks, time_limit=cfg.time_limit, unit=cfg.align, name=f"level 1 {phase}",
                       kinds=kinds, progress=progress)


def head_bytes(profile: Profile, cfg: SolveConfig) -> int:
    m = profile.model
    return aligned(m.head_bytes_per_token * cfg.tokens_per_gpu + m.head_bytes_fixed, cfg)


CUBLAS_WORKSPACE = (32 << 20) + (1 << 20)  # cuBLAS (sm90: 4096*8 KiB) + cuBLASLt, per stream


def workspace_bytes(profile: Profile, cfg: SolveConfig) -> int:
    """Kernel workspaces a fake-tensor trace cannot see, on one GPU, from documented formulas:

    - flash attention's backward (``mha_bwd`` in PyTorch's ``flash_api.cpp``) accumulates dq in
      float32 (``dq_accum``: the query's shape, its token and head dims rounded up, 4 bytes
      each) beside ``softmax_d`` (float32, one per query row): about 4 bytes per element of the
      attention output, plus 4 per row, for each attention op of a layer (one layer's backward
      at a time);
    - cuBLAS and cuBLASLt keep one workspace per (thread, stream) for the whole process: the
      training thread and autograd's device thread.
    """
    attention = 0
    for t in profile.layer.saved:
        if t.kind == "mixing_output" and "attention" in t.producer and t.producer.endswith("[0]") \
                and len(t.shape) >= 3 and math.prod(t.shape):
            elems = per_gpu_bytes(t.law, cfg) / (t.bytes / math.prod(t.shape))
            rows = elems / t.shape[-1]
            attention += int(4 * elems + 4 * rows)
    return attention + 2 * CUBLAS_WORKSPACE


def pool_parts(profile: Profile, cfg: SolveConfig, lb: LayerBytes) -> dict[str, int]:
    """What the run allocates outside the arena, from PyTorch's allocator, on top of it, by
    part (all counted as live together: an upper bound): what the model's own code holds
    outside the layers up to the head phase (``head_bytes``: logits, their loss copy and
    gradients), the embedding's output (layer 0's input), kernel workspaces, and FSDP2's
    unsharded parameters and reduce-scatter buffers (``solve.parallel.fsdp_headroom``)."""
    return {"head": head_bytes(profile, cfg), "embedding_output": lb.input,
            "workspaces": workspace_bytes(profile, cfg), **fsdp_headroom(profile, cfg)}


def pool_bytes(profile: Profile, cfg: SolveConfig, lb: LayerBytes) -> int:
    return sum(pool_parts(profile, cfg, lb).values())


def level2_blocks(layers: Sequence[LayerDecision], lb: LayerBytes, fwd_peak: int, bwd_peak: int,
                  align: int) -> list[Block]:
    """The iteration's blocks (see the module docstring for the steps)."""
    n = len(layers)
    steps = Steps(n)
    F, R, B, H = steps.forward, steps.rebuild, steps.backward, steps.head
    skeletal_rest = lb.total - lb.input
    blocks: list[Block] = []

    def add(name: str, i: int, size: int, first: int, last: int) -> None:
        if name == "hidden" and i == 0:
            return  # the embedding's output: PyTorch's allocator (pool_bytes), not the arena
        blocks.append(Block(id=f"{name}[{i}]", size=int(math.ceil(size / align) * align),
                            start=first, end=last + 1))

    heads, down = _chains(layers)

    def add_split(i: int, alpha: float, first: int) -> int:
        """Growing blocks of layer i's split tensors whose tokens are outermost; the bytes
        of the others (their full buffers come back with the prefetch)."""
        rest = 0
        for t in lb.splits:
            if not t.outer:
                rest += t.nbytes
                continue
            head = t.head(alpha, align)
            tail = t.nbytes - head
            name = f"split[{i}]:{t.name}"
            if head and tail:
                blocks.append(Block(id=name, size=head, start=first, end=B(i) + 1,
                                    grow=tail, grow_at=R(i), grows_down=i in down))
            elif head:
                blocks.append(Block(id=name, size=head, start=first, end=B(i) + 1))
            else:
                blocks.append(Block(id=name, size=tail, start=R(i), end=B(i) + 1))
        return rest

    for d in layers:
        i = d.index
        made = F(i) - 1  # the step that produces layer i's input (embedding or forward i-1)
        add("fwd", i, fwd_peak, F(i), F(i))
        add("bwd", i, bwd_peak, B(i), B(i))
        add("grad", i, lb.input, B(i), B(i - 1) if i > 0 else B(0))
        if d.mode == "offload":
            copied_by = F(i + 1) if i + 1 < n else H
            add("hidden", i, lb.input, made, copied_by)
            add("round", i, skeletal_rest, F(i), copied_by)
            prefetch_from = R(i + 1) if i + 1 < n else H  # when layer i+1's backward starts
            rest = add_split(i, d.alpha, prefetch_from) if lb.splits else lb.token_wise
            add("prefetch", i, lb.always + rest, prefetch_from, B(i))
            add("recompute", i, int((1.0 - d.alpha) * fwd_peak), R(i), R(i))
        elif d.mode == "keep":
            add("hidden", i, lb.input, made, B(i))
            kept = [t for t in lb.splits if t.outer] if i in heads else []
            for t in kept:  # whole, where the layer below's copied tokens can nest (`chains`)
                blocks.append(Block(id=f"kept[{i}]:{t.name}", size=t.nbytes, start=F(i),
                                    end=B(i) + 1))
            add("round", i, skeletal_rest - sum(t.nbytes for t in kept), F(i), B(i))
        else:  # checkpointed: forward runs without keeping its saved tensors
            add("hidden", i, lb.input, made, B(i))
            add("round", i, skeletal_rest, F(i), F(i))
            # the re-run forward's saved tensors stay for the backward graph
            add("recompute", i, skeletal_rest + fwd_peak, R(i), B(i))
    return blocks


def _chains(layers: Sequence[LayerDecision]) -> tuple[set[int], set[int]]:
    """The kept layers right above an offloaded layer that splits its tensors (their split
    tensors become blocks of their own, ``kept[i]:NAME``, which can lie where that layer's
    recomputed tokens go, until they come), and the offloaded layers whose split tensors'
    copied tokens are their last ones, growing down: every second layer of each run of
    offloaded layers with the same alpha, from the run's last layer (growing up), the first
    whose backward runs (`chained_splits` interleaves them)."""
    by_index = {d.index: d for d in layers}
    heads, down = set(), set()
    for d in sorted(layers, key=lambda d: -d.index):
        above = by_index.get(d.index + 1)
        if d.mode != "offload" or not 0 < d.alpha < 1 or above is None:
            continue
        if above.mode == "keep":
            heads.add(above.index)
        elif above.mode == "offload" and above.alpha == d.alpha and above.index not in down:
            down.add(d.index)
    return heads, down


def level2(layers: Sequence[LayerDecision], lb: LayerBytes, fwd: LevelPlan, bwd: LevelPlan,
           cfg: SolveConfig, progress: Progress) -> LevelPlan:
    blocks = level2_blocks(layers, lb, fwd.peak, bwd.peak, cfg.align)
    kinds = {str(b.id): LEVEL2_KINDS[str(b.id).split("[")[0]] for b in blocks}
    began = time.perf_counter()
    progress(f"interleaving level 2's split tensors ({len(blocks)} tensors)")
    starts = level2_starts(blocks, len(layers), seconds=START_SHARE * cfg.time_limit)
    left = max(cfg.time_limit - (time.perf_counter() - began), 0.1 * cfg.time_limit)
    return solve_level(blocks, time_limit=left,
                       unit=cfg.align, name="level 2 iteration", kinds=kinds, progress=progress,
                       starts=starts)


START_SHARE = 0.5  # of the time limit, for the order search of `chained_splits`; the solver
# gets the rest


def level2_starts(blocks: list[Block], layers: int,
                  seconds: float = 0.0) -> list[Placement | None]:
    """Level 2's structured start plans (module docstring): `phase_ordered`, `stacked_splits`
    and `chained_splits`, the last with an order search in `seconds` unless one of them (or
    greedy-by-size) already meets the lower bound."""
    starts = [phase_ordered(blocks, Steps(layers).head), stacked_splits(blocks),
              chained_splits(blocks, layers)]
    live = [b for b in blocks if not b.is_trivial]
    bound = max([hole_bound(live)] + [b.top for b in live])
    best = min([solve_greedy(live).peak] + [s.peak for s in starts if s is not None])
    if starts[2] is not None and best > bound:
        starts[2] = chained_splits(blocks, layers, deadline=time.perf_counter() + seconds)
    return starts


def phase_ordered(blocks: list[Block], head: int) -> Placement:
    """First-fit with the blocks live at step `head` first, outermost lifetime first, then the
    others in greedy-by-size's order.

    The phases come in order (forward, head, backward), so every block that spans forward and
    backward is live at the head step: a kept or checkpointed layer's input and saved tensors,
    whose lifetimes nest (a later layer's start later and end earlier). Stacked at the bottom,
    outermost lowest, the live ones form a stack without holes at every step, and the blocks
    of the forward and of the backward, which never meet, fill in above them. Greedy-by-size
    instead puts the largest first and can leave holes in that stack: where host memory runs
    short and 25 of Llama-7B's layers are checkpointed at 1M tokens on 8 GPUs, it ends 0.8% over
    the bound, and this start at the bound (tests/test_dsa.py)."""
    live = [b for b in blocks if not b.is_trivial]
    spanning = sorted((b for b in live if b.start <= head < b.end), key=lambda b: (b.start, -b.end))
    others = sorted((b for b in live if not b.start <= head < b.end),  # greedy-by-size's order
                    key=lambda b: (-b.top, -(b.end - b.start), b.start))
    offsets = first_fit(live, spanning + others)
    offsets.update({b.id: 0 for b in blocks if b.is_trivial})
    return Placement(offsets=offsets, peak=peak_of(live, offsets), lower_bound=lower_bound(live),
                     method="phase-ordered", status="feasible", gap=0.0, seconds=0.0)


def stacked_splits(blocks: list[Block]) -> Placement | None:
    """A valid placement where each layer's split blocks sit whole, one after the other, right
    above its prefetch block: greedy-by-size on the blocks with each layer's prefetch and split
    blocks merged into one (what the schedule was before split tensors' recomputed tokens came
    late). Greedy-by-size on many small growing blocks can fragment badly; this start keeps the
    plan from ever being worse than that schedule. None when there are no split blocks."""
    live = [b for b in blocks if not b.is_trivial]
    splits: dict[str, list[Block]] = {}
    for b in live:
        if str(b.id).startswith("split["):
            splits.setdefault(f"prefetch[{str(b.id)[6:].split(']')[0]}]", []).append(b)
    if not splits:
        return None
    by_id = {b.id: b for b in live}
    merged = []
    for b in live:
        if str(b.id).startswith("split["):
            continue
        parts = splits.get(str(b.id), [])
        if parts:
            b = Block(id=b.id, size=b.size + sum(p.top for p in parts),
                      start=min([b.start] + [p.start for p in parts]),
                      end=max([b.end] + [p.end for p in parts]))
        merged.append(b)
    for name in splits:  # a layer whose prefetch block is empty (everything split)
        if name not in by_id:
            parts = splits[name]
            merged.append(Block(id=name, size=sum(p.top for p in parts),
                                start=min(p.start for p in parts), end=max(p.end for p in parts)))
    base = solve_greedy(merged)
    offsets = {b.id: base.offsets[b.id] for b in merged if b.id in by_id}
    for name, parts in splits.items():
        at = base.offsets[name] + (by_id[name].size if name in by_id else 0)
        for p in parts:
            offsets[p.id] = at
            at += p.top
    for b in blocks:
        offsets.setdefault(b.id, 0)
    return Placement(offsets=offsets, peak=peak_of(live, offsets), lower_bound=lower_bound(live),
                     method="stacked", status="feasible", gap=0.0, seconds=base.seconds)


def chained_splits(blocks: list[Block], layers: int, *,
                   deadline: float | None = None) -> Placement | None:
    """A valid placement where each split tensor's layers interleave two by two: greedy-by-size
    (or `phase_ordered`, the lower) on the blocks with each chain of one tensor's blocks merged
    into one (`chains`), then each layer's block put back inside it. None without a chain.

    While layer i holds a split tensor whole (N bytes), layer i-1 holds its copied tokens (h
    bytes), and they need N + h bytes together, not 2N. A merged block of N + h bytes holds
    them: layer i at its bottom (growing up from its copied tokens), layer i-1 h bytes above
    (growing down: its copied tokens are its last ones and lie right above layer i's tensor),
    layer i-2 at the bottom again, and so on, with no hole left in the backward (where
    `stacked_splits` leaves N - h bytes per tensor). Each try (greedy-by-size and
    `phase_ordered` on the merged blocks) gets an order search (`dsa.search_orders`) in an
    equal share of the time to `deadline`, when there is one."""
    live = [b for b in blocks if not b.is_trivial]
    found = chains(live)
    if not found:
        return None
    inside = {b.id for c in found for b in c}
    merged = [b for b in live if b.id not in inside] + [_merged(c) for c in found]
    starts = [solve_greedy(merged), phase_ordered(merged, Steps(layers).head)]
    tries = list(starts)
    if deadline is not None:
        target = hole_bound(live)
        for n, start in enumerate(starts):
            share = (deadline - time.perf_counter()) / (len(starts) - n)
            searched = search_orders(merged, start.offsets, target=target,
                                     deadline=time.perf_counter() + share)
            tries.append(dataclasses.replace(start, offsets=searched,
                                             peak=peak_of(merged, searched)))
    base = min(tries, key=lambda p: p.peak)
    at = base.offsets
    offsets = {b.id: at[b.id] for b in live if b.id not in inside}
    for c in found:
        offsets.update(_unmerged(c, at[f"chain:{c[0].id}"]))
    for b in blocks:
        offsets.setdefault(b.id, 0)
    return Placement(offsets=offsets, peak=peak_of(live, offsets), lower_bound=lower_bound(live),
                     method="chained", status="feasible", gap=0.0, seconds=base.seconds,
                     note=f"{len(found)} runs of split tensors interleaved over "
                          f"{sum(map(len, found))} layer tensors")


def chains(live: list[Block]) -> list[list[Block]]:
    """Each split tensor's runs of layers that interleave (`chained_splits`), top layer first:
    consecutive layers whose growing blocks match in size and growth, alternate in direction
    (the first growing up) and follow each other in time as in the backward (the next layer's
    copied tokens come when a layer grows, after the layer above it is gone, and grow after
    it is gone). Runs of one layer are left out."""
    by_tensor: dict[str, dict[int, Block]] = {}
    for b in live:
        name, _, tensor = str(b.id).partition(":")
        if name.startswith("split[") and b.grow:
            by_tensor.setdefault(tensor, {})[int(name[6:-1])] = b
    found = []
    for members in by_tensor.values():
        run: list[Block] = []
        for i in sorted(members, reverse=True):
            b, last = members[i], run[-1] if run else None
            # the layer below: its copied tokens come when this one grows, it grows once this
            # one is gone, and they come once the layer above this one is gone (as
            # `level2_blocks` makes them)
            if last is not None and members.get(i + 1) is last and b.grows_down != last.grows_down \
                    and (b.size, b.grow) == (last.size, last.grow) and b.start == last.grow_at \
                    and last.end <= b.grow_at and (len(run) < 2 or run[-2].end <= b.start):
                run.append(b)
                continue
            if len(run) > 1:
                found.append(run)
            run = [] if b.grows_down else [b]
        if len(run) > 1:
            found.append(run)
    return found


def _merged(chain: list[Block]) -> Block:
    """One block for a chain (`chains`): the first layer's copied tokens (h bytes) from their
    start, N + h bytes from its growth on (when the next layer's copied tokens come), until
    the last layer ends."""
    first = chain[0]
    return Block(id=f"chain:{first.id}", size=first.size, start=first.start,
                 end=max(b.end for b in chain), grow=first.top, grow_at=first.grow_at)


def _unmerged(chain: list[Block], at: int) -> dict:
    """The links' offsets in a merged block at `at`: growing down, right above the copied
    tokens (h bytes) of the links growing up, which sit at the bottom."""
    return {b.id: at + (b.size if b.grows_down else 0) for b in chain}


LEVEL2_KINDS = {"fwd": "transient", "bwd": "transient", "grad": "grad",
                "hidden": "input", "round": "rounding", "kept": "rounding", "prefetch": "prefetch",
                "split": "split", "recompute": "recompute"}
