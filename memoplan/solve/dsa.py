"""Dynamic storage allocation (DSA): the data types and the algorithms that need no MIP solver.

A profiled request trace (``[op, id, bytes]`` with op ``"malloc"`` or ``"free"``) becomes a list
of `Block`s: each tensor is ``size`` bytes live over request steps ``[start, end)``. A
`Placement` gives every block a byte offset inside one arena; two blocks whose lifetimes
overlap must not overlap in address. Here:

- `blocks_from_requests`: trace -> blocks, with clear errors for malformed traces;
- `lower_bound`: the largest total of simultaneously live bytes (no plan can do better), and
  `hole_bound`, a bound at least as high that counts the holes growing blocks leave;
- `solve_greedy`: greedy-by-size (TFLite's arena planner, OLLA's baseline), the fallback and
  the warm start of the MIP in `mip_dsa`; `greedy_offsets`, `lowest_fit`, `first_fit` and
  `peak_of` are its parts, shared with the MIP;
- `search_orders`: iterated local search over the order in which blocks are placed first-fit,
  the step `mip_dsa` runs between its start plan and CBC;
- `simulate_best_fit`: an online best-fit allocator on one arena (a baseline).

Lifetimes are half-open: a block freed at step ``j`` and one malloc'ed at step ``j`` may share
bytes. Blocks of size 0 or with an empty lifetime (``start == end``) conflict with nothing and
go to offset 0, but like every block they must end at or below the peak.

A block may *grow*: ``size`` bytes from ``start``, ``size + grow`` bytes (the same offset, the
extra bytes right after) from step ``grow_at`` until ``end``. This is one tensor whose first
part is needed earlier than the rest (a split tensor's copied tokens arrive one layer before
its recomputed ones, and the whole tensor must still be one contiguous buffer). With
``grows_down`` the early part is the tensor's last ``size`` bytes instead (its copied tokens
are its last ones) and the extra bytes come right before them: the block spans
``[offset, offset + size + grow)`` once grown either way. Two blocks conflict over the bytes
each holds during their common steps (`Block.span`, `Block.below`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from memoplan.errors import MemoplanError

BlockId = int | str


@dataclass(frozen=True, kw_only=True)
class Block:
    """A tensor to place: `size` bytes live over request steps [start, end)."""

    id: BlockId
    size: int  # bytes
    start: int  # first request step at which the block is live
    end: int  # first request step at which it is dead again (exclusive)
    grow: int = 0  # extra bytes, right after `size`, live from step `grow_at` to `end`
    grow_at: int = 0
    grows_down: bool = False  # the extra bytes come before `size`'s (see the module docstring)

    def __post_init__(self) -> None:
        if not isinstance(self.id, int | str) or isinstance(self.id, bool):
            raise MemoplanError(f"Block id must be an int or a str, got {self.id!r}.")
        for name in ("size", "start", "end", "grow", "grow_at"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise MemoplanError(f"Block {self.id!r}: {name} must be an int, got {value!r}.")
        if self.size < 0:
            raise MemoplanError(f"Block {self.id!r}: size must be >= 0 bytes, got {self.size}.")
        if not 0 <= self.start <= self.end:
            raise MemoplanError(
                f"Block {self.id!r}: need 0 <= start <= end, "
                f"got start={self.start}, end={self.end}."
            )
        if self.grow < 0 or (self.grow and not self.start < self.grow_at < self.end):
            raise MemoplanError(
                f"Block {self.id!r}: a growing block needs grow >= 0 and start < grow_at < end, "
                f"got grow={self.grow}, grow_at={self.grow_at} over [{self.start}, {self.end}).")

    @property
    def top(self) -> int:
        """The most bytes the block holds at any step (what must fit under the peak)."""
        return self.size + self.grow

    def span(self, other: Block) -> tuple[int, int]:
        """The bytes, from its offset, this block holds during the steps it shares with
        `other`: ``[0, top)`` once it has grown by then, else its early part."""
        if not self.grow or self.grow_at < min(self.end, other.end):
            return 0, self.top
        return (self.grow, self.top) if self.grows_down else (0, self.size)

    def below(self, other: Block) -> int:
        """How far above this block's offset `other`'s must be at least for this block to lie
        below it while both live (the bytes this one holds then, less the bytes `other` leaves
        free from its own offset)."""
        return self.span(other)[1] - other.span(self)[0]

    @property
    def is_trivial(self) -> bool:
        """True when the block needs no memory at any time (size 0 or empty lifetime)."""
        return self.top == 0 or self.start == self.end


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Offsets (bytes) for every block, the arena size they need, and how they were found."""

    offsets: dict[BlockId, int]
    peak: int  # bytes: max over blocks of offset+size (0 for no blocks)
    lower_bound: int  # bytes: largest total of simultaneously live bytes
    method: str  # "mip", "search", "greedy", ...
    status: str  # "optimal", "feasible" (time limit hit, best found), "greedy-fallback"
    gap: float  # (peak - best_bound)/peak as reported by the solver; 0.0 if optimal
    seconds: float  # wall time the solver spent
    note: str = ""  # what the solver did and skipped, and why (e.g. no MIP: start at the bound)
    # (stage, peak bytes after it, seconds since the solver began), in order: "start", "search",
    # "mip"; a stage that did not run is absent
    stages: tuple[tuple[str, int, float], ...] = ()


def lifetimes_overlap(a: Block, b: Block) -> bool:
    """True when both blocks are live at some common step (half-open intervals)."""
    return max(a.start, b.start) < min(a.end, b.end)


def _parse_request(index: int, entry: object) -> tuple[str, BlockId, int]:
    """Validate one ``[op, id, bytes]`` entry and return it as a tuple."""
    if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 3:
        raise MemoplanError(
            f"Request {index}: expected [op, id, bytes], got {entry!r}. "
            "Each request must be a list of three items, e.g. [\"malloc\", 7, 4096]."
        )
    op, tensor_id, nbytes = entry
    if op not in ("malloc", "free"):
        raise MemoplanError(f"Request {index}: op must be \"malloc\" or \"free\", got {op!r}.")
    if isinstance(tensor_id, bool) or not isinstance(tensor_id, int | str):
        raise MemoplanError(f"Request {index}: id must be an int or a str, got {tensor_id!r}.")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise MemoplanError(f"Request {index}: bytes must be an int, got {nbytes!r}.")
    if nbytes < 0:
        raise MemoplanError(
            f"Request {index}: {op} of id {tensor_id!r} has negative bytes ({nbytes}); "
            "sizes must be >= 0."
        )
    return op, tensor_id, nbytes


def _live_at_start(live_at_start: dict | None) -> dict[BlockId, int]:
    """Validate the tensors alive before the first request: ``{id: bytes}``."""
    live: dict[BlockId, int] = {}
    for tensor_id, nbytes in (live_at_start or {}).items():
        if isinstance(tensor_id, bool) or not isinstance(tensor_id, int | str):
            raise MemoplanError(f"live_at_start: id must be an int or a str, got {tensor_id!r}.")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise MemoplanError(
                f"live_at_start: id {tensor_id!r} has bytes {nbytes!r}; need an int >= 0."
            )
        live[tensor_id] = nbytes
    return live


def blocks_from_requests(
    requests: Iterable[Sequence], *, live_at_start: dict | None = None
) -> list[Block]:
    """Turn a request trace into blocks, one per malloc (and per tensor live at the start).

    Request ``i`` is step ``i``: a malloc at ``i`` starts a block at ``i``; a free at ``j`` ends
    it at ``j`` (exclusive); a block never freed lives to ``len(requests)``. ``live_at_start``
    maps ids of tensors alive before the first request to their bytes (start 0). Blocks come
    back in malloc order, tensors live at the start first. An id may be reused after its free;
    the later block then gets the id ``f"{id}#{n}"`` (n = 1, 2, ...).

    Raises MemoplanError for a free of an unknown id, a malloc of an id that is still live,
    negative bytes, a free whose bytes differ from its malloc's, or a malformed entry.

    >>> [b.end for b in blocks_from_requests([["malloc", 1, 8], ["malloc", 2, 8], ["free", 1, 8]])]
    [2, 3]
    """
    entries = [_parse_request(i, entry) for i, entry in enumerate(requests)]
    reader = _TraceReader(_live_at_start(live_at_start))
    for step, (op, tensor_id, nbytes) in enumerate(entries):
        if op == "malloc":
            reader.malloc(step, tensor_id, nbytes)
        else:
            reader.free(step, tensor_id, nbytes)
    blocks = reader.finish(len(entries))
    check_unique_ids(blocks)
    return blocks


class _TraceReader:
    """Open lifetimes while a trace is read; closed ones become blocks."""

    def __init__(self, live: dict[BlockId, int]) -> None:
        self.open: dict[BlockId, tuple[BlockId, int, int]] = {  # id -> (block id, bytes, start)
            tensor_id: (tensor_id, nbytes, 0) for tensor_id, nbytes in live.items()
        }
        self.order = list(self.open)  # block ids in malloc order
        self.mallocs = {tensor_id: 1 for tensor_id in self.open}  # id -> mallocs so far
        self.done: dict[BlockId, Block] = {}

    def malloc(self, step: int, tensor_id: BlockId, nbytes: int) -> None:
        if tensor_id in self.open:
            raise MemoplanError(
                f"Request {step}: malloc of id {tensor_id!r}, which is still live "
                f"(allocated at step {self.open[tensor_id][2]}); free it first or use a new id."
            )
        count = self.mallocs.get(tensor_id, 0)
        self.mallocs[tensor_id] = count + 1
        block_id = tensor_id if count == 0 else f"{tensor_id}#{count}"
        self.open[tensor_id] = (block_id, nbytes, step)
        self.order.append(block_id)

    def free(self, step: int, tensor_id: BlockId, nbytes: int) -> None:
        if tensor_id not in self.open:
            raise MemoplanError(
                f"Request {step}: free of unknown id {tensor_id!r}: it was never malloc'ed, "
                "is already freed, or is missing from live_at_start."
            )
        block_id, size, start = self.open.pop(tensor_id)
        if nbytes != size:
            raise MemoplanError(
                f"Request {step}: free of id {tensor_id!r} says {nbytes} bytes but its malloc "
                f"said {size}; a free must repeat the malloc's bytes."
            )
        self.done[block_id] = Block(id=block_id, size=size, start=start, end=step)

    def finish(self, steps: int) -> list[Block]:
        """All blocks in malloc order; those still open live to the end of the trace."""
        for block_id, size, start in self.open.values():
            self.done[block_id] = Block(id=block_id, size=size, start=start, end=steps)
        return [self.done[block_id] for block_id in self.order]


def check_unique_ids(blocks: Sequence[Block]) -> None:
    """Raise MemoplanError when two blocks share an id (offsets are keyed by id)."""
    seen: set[BlockId] = set()
    for block in blocks:
        if block.id in seen:
            raise MemoplanError(f"Two blocks have the id {block.id!r}; block ids must be unique.")
        seen.add(block.id)


def lower_bound(blocks: Iterable[Block]) -> int:
    """Largest total of simultaneously live bytes (sweep line over starts and ends).

    >>> lower_bound([Block(id=1, size=4, start=0, end=2), Block(id=2, size=3, start=1, end=3)])
    7
    """
    events: list[tuple[int, int]] = []  # (step, +size at start / -size at end)
    for block in blocks:
        if not block.is_trivial:
            events.append((block.start, block.size))
            events.append((block.end, -block.top))
            if block.grow:
                events.append((block.grow_at, block.grow))
    events.sort()  # at equal steps the ends (negative) come first: lifetimes are half-open
    live = best = 0
    for _, delta in events:
        live += delta
        best = max(best, live)
    return best


def hole_bound(blocks: Iterable[Block]) -> int:
    """A lower bound on the peak, at least `lower_bound`, that counts growing blocks' holes.

    While a growing block G holds only its head, the ``G.grow`` bytes right after it are a
    hole: a block b may lie there only if b is dead by ``G.grow_at`` (else both would hold those
    bytes at once). At a step k, take the growing blocks still in their head phase (a head of
    at least a byte), leaving out any that may lie in another's hole (dead by the other's
    ``grow_at``): their holes are then pairwise disjoint (two such blocks are whole together
    at some step). The peak must hold the live bytes and these holes, less what other live
    blocks cover of the holes. Such a block f must be dead by the grow_at of each hole it is
    in. A hole lies right after its head, or right before it for a block that ``grows_down``,
    and f contains no head (live at k): so it covers at most two holes, the hole of one that
    grows up and, right above it, the hole of one that grows down. So, at every step k:

        peak >= live(k) + max(0, sum of holes - sum over such f of min(f.top, largest hole
                              of each direction f may be in, added))

    Without growing blocks this is `lower_bound`.

    Two blocks of 1 byte that grow by 4 at step 2, and one of 10 bytes dead by then: at step 0
    the big one fills one hole, and the other hole stays empty (optimum 16: g, f from byte 1
    over g's hole, h from byte 11).

    >>> grows = [Block(id=g, size=1, start=0, end=3, grow=4, grow_at=2) for g in "gh"]
    >>> big = Block(id="f", size=10, start=0, end=2)
    >>> lower_bound(grows + [big]), hole_bound(grows + [big])
    (12, 16)
    """
    blocks = [b for b in blocks if not b.is_trivial]
    best = lower_bound(blocks)
    growing = [b for b in blocks if b.grow]
    for k in sorted({b.start for b in blocks}) if growing else ():
        live = [b for b in blocks if b.start <= k < b.end]
        heads = [g for g in growing if g.size and g.start <= k < g.grow_at]
        holes = [g for g in heads if not any(h is not g and g.end <= h.grow_at for h in heads)]
        if not holes:
            continue
        cover = 0
        for f in live:
            room = [g for g in holes if g is not f and f.end <= g.grow_at]
            cover += min(f.top, max((g.grow for g in room if not g.grows_down), default=0)
                         + max((g.grow for g in room if g.grows_down), default=0))
        held = sum(b.top if b.grow and b.grow_at <= k else b.size for b in live)
        best = max(best, held + max(0, sum(g.grow for g in holes) - cover))
    return best


def greedy_offsets(blocks: Sequence[Block]) -> dict[BlockId, int]:
    """Greedy-by-size offsets: largest block first, each at the lowest offset that fits.

    Ties go to the longer-lived block, then the earlier start, then input order. A block is
    placed first-fit into the gaps between already-placed blocks that overlap it in time.
    """
    order = sorted(
        range(len(blocks)),
        key=lambda i: (-blocks[i].top, -(blocks[i].end - blocks[i].start), blocks[i].start, i),
    )
    offsets: dict[BlockId, int] = {}
    placed: list[Block] = []
    for i in order:
        block = blocks[i]
        if block.is_trivial:
            offsets[block.id] = 0
            continue
        offsets[block.id] = lowest_fit(block, placed, offsets)
        placed.append(block)
    return offsets


def lowest_fit(block: Block, placed: list[Block], offsets: dict[BlockId, int]) -> int:
    """Lowest offset where `block` fits between the placed blocks live at the same time.

    Each such block forbids the offsets in (its offset - `block.below(it)`, its offset +
    `it.below(block)`): with neither growing, (its offset - `block`'s size, its offset + its
    size). The answer is the lowest offset >= 0 none forbids."""
    forbidden = sorted(
        (offsets[other.id] - block.below(other), offsets[other.id] + other.below(block))
        for other in placed
        if lifetimes_overlap(block, other)
    )
    candidate = 0
    for low, high in forbidden:
        if low >= candidate:
            break
        candidate = max(candidate, high)
    return candidate


def first_fit(blocks: Sequence[Block], order: Sequence[Block]) -> dict[BlockId, int]:
    """Offsets from placing `order` (the blocks, in any order) one by one at the lowest offset
    that fits (`lowest_fit`); trivial blocks go to 0.

    Placing blocks in the order of any valid plan's offsets, lowest first, gives a plan whose
    peak is no higher: by induction each block lands at or below its offset in that plan (the
    blocks placed before it lie below it there, and were moved only down). So some order gives
    an optimum, and `search_orders` searches over orders. With blocks that grow down this can
    fail (a block in the hole under another's first bytes has the higher offset of the two but
    lies below it in memory), so the search keeps the plan it starts from when it finds
    nothing lower (`search_orders`)."""
    by_id = {b.id: b for b in blocks}
    placed: list[Block] = []
    offsets: dict[BlockId, int] = {}
    for b in order:
        block = by_id[b.id]
        offsets[block.id] = 0 if block.is_trivial else lowest_fit(block, placed, offsets)
        if not block.is_trivial:
            placed.append(block)
    return offsets


def peak_of(blocks: Iterable[Block], offsets: dict[BlockId, int]) -> int:
    """Arena size the offsets need: max of offset + size (0 when there are no blocks)."""
    return max((offsets[b.id] + b.top for b in blocks), default=0)


def solve_greedy(blocks: Sequence[Block]) -> Placement:
    """Place blocks greedy-by-size (TFLite arena planner / OLLA style); see `greedy_offsets`.

    The status is "optimal" when the peak meets the lower bound (or the largest block), else
    "feasible" with the gap to that bound.

    >>> plan = solve_greedy([Block(id="a", size=4, start=0, end=2),
    ...                      Block(id="b", size=3, start=1, end=3)])
    >>> plan.offsets, plan.peak
    ({'a': 0, 'b': 4}, 7)
    """
    began = time.perf_counter()
    blocks = list(blocks)
    check_unique_ids(blocks)
    offsets = greedy_offsets(blocks)
    peak = peak_of(blocks, offsets)
    bound = lower_bound(blocks)
    floor = max([hole_bound(blocks)] + [b.top for b in blocks])  # blocks never live still fit
    gap = (peak - floor) / peak if peak else 0.0
    return Placement(
        offsets=offsets,
        peak=peak,
        lower_bound=bound,
        method="greedy",
        status="optimal" if gap == 0 else "feasible",
        gap=gap,
        seconds=time.perf_counter() - began,
    )


SEARCH_STALL = 2000  # placements without a lower peak before the search restarts from its best
SEARCH_KICK = 3  # random moves that restart it
SEARCH_PATIENCE = 20 * SEARCH_STALL  # placements without a new best before it gives up


def search_orders(blocks: Sequence[Block], offsets: dict[BlockId, int], *, target: int,
                  deadline: float, max_evals: int = 10**6, seed: int = 0) -> dict[BlockId, int]:
    """Offsets with a peak at most that of `offsets` (a valid plan), found by iterated local
    search over the order in which `first_fit` places the blocks.

    It starts from the order of `offsets` (lowest first, which first-fit places no higher) and
    moves one block to another place in the order; a move is kept when the peak does not rise,
    so the search drifts along plateaus. After `SEARCH_STALL` placements without a lower peak it
    restarts from the best order with `SEARCH_KICK` random moves. It stops when the peak reaches
    `target` (a lower bound), at `deadline` (``time.perf_counter``), after `max_evals`
    placements or after `SEARCH_PATIENCE` placements without a new best: deterministic for a
    seed, unless the deadline stops it. A placement re-places only the blocks from the first
    moved position on and stops as soon as it passes the peak to beat."""
    live = [b for b in blocks if not b.is_trivial]
    result = {b.id: 0 for b in blocks}
    if len(live) < 2:
        return {**result, **{b.id: offsets[b.id] for b in live}}
    order = sorted(range(len(live)), key=lambda i: (offsets[live[i].id], -live[i].top, i))
    placed = _FirstFit.of(live).search(order, target=target, deadline=deadline,
                                       max_evals=max_evals, seed=seed)
    if max(p + b.top for p, b in zip(placed, live)) > peak_of(live, offsets):
        placed = [offsets[b.id] for b in live]  # (blocks growing down: `first_fit`)
    result.update({b.id: placed[i] for i, b in enumerate(live)})
    return result


def conflicting_pairs(blocks: Sequence[Block]) -> list[tuple[int, int]]:
    """Index pairs (i, j) of blocks live at a common step (a sweep over their starts); i was
    placed in the sweep before j."""
    pairs = []
    live: list[int] = []
    for j in sorted(range(len(blocks)), key=lambda i: blocks[i].start):
        live = [i for i in live if blocks[i].end > blocks[j].start]
        pairs.extend((i, j) for i in live)
        live.append(j)
    return pairs


class _FirstFit:
    """First-fit placement of blocks by index, given each block's size (`tops`) and its
    conflicts: (other block, how far below the other's offset this one's must stay to lie below
    it, how far above to lie above it: `Block.below` each way)."""

    def __init__(self, tops: list[int], conflicts: list[list[tuple[int, int, int]]]) -> None:
        self.top = tops
        self.conflicts = conflicts

    @classmethod
    def of(cls, blocks: list[Block]) -> _FirstFit:
        """The blocks (none trivial) with their conflicts worked out once from lifetimes."""
        conflicts: list[list[tuple[int, int, int]]] = [[] for _ in blocks]
        for i, j in conflicting_pairs(blocks):
            a, b = blocks[i], blocks[j]
            conflicts[i].append((j, a.below(b), b.below(a)))
            conflicts[j].append((i, b.below(a), a.below(b)))
        return cls([b.top for b in blocks], conflicts)

    def place(self, order: list[int], offsets: list[int | None], first: int,
              limit: float) -> int | None:
        """Place ``order[first:]`` first-fit, given the offsets of ``order[:first]`` (updated
        in place); the peak, or None as soon as it exceeds `limit`."""
        for i in order[first:]:
            offsets[i] = None
        peak = max((offsets[i] + self.top[i] for i in order[:first]), default=0)
        for i in order[first:]:
            forbidden = sorted((offsets[j] - low, offsets[j] + high)
                               for j, low, high in self.conflicts[i] if offsets[j] is not None)
            at = 0
            for low, high in forbidden:
                if low >= at:
                    break
                at = max(at, high)
            offsets[i] = at
            peak = max(peak, at + self.top[i])
            if peak > limit:
                return None
        return peak

    def search(self, order: list[int], *, target: int, deadline: float,
               max_evals: int = 10**6, seed: int = 0) -> list[int]:
        """The offsets of the best first-fit order found from `order` (see `search_orders`)."""
        n = len(self.top)
        placed: list[int | None] = [None] * n
        peak = self.place(order, placed, 0, math.inf)
        best, best_order, best_placed = peak, order, placed
        rng = random.Random(seed)
        evals = since_lower = since_best = 0
        while n > 1 and best > target and evals < max_evals \
                and since_best < SEARCH_PATIENCE and time.perf_counter() < deadline:
            if since_lower >= SEARCH_STALL:
                order = list(best_order)
                for _ in range(SEARCH_KICK):
                    order.insert(rng.randrange(n), order.pop(rng.randrange(n)))
                placed = [None] * n
                peak = self.place(order, placed, 0, math.inf)
                since_lower = 0
            i, j = rng.randrange(n), rng.randrange(n - 1)
            j += j >= i  # another place
            trial_order = list(order)
            trial_order.insert(j, trial_order.pop(i))
            trial = list(placed)
            trial_peak = self.place(trial_order, trial, min(i, j), peak)
            evals += 1
            since_lower += 1
            since_best += 1
            if trial_peak is None:
                continue
            if trial_peak < peak:
                since_lower = 0
            order, placed, peak = trial_order, trial, trial_peak
            if peak < best:
                best, best_order, best_placed, since_best = peak, order, placed, 0
        return best_placed


def simulate_best_fit(blocks: Sequence[Block]) -> Placement:
    """An online best-fit allocator on one arena: requests in time order (frees before mallocs
    at a step, mallocs in input order), each block at the start of the smallest free gap that
    holds it (the lowest on ties), else on top of the highest live block. It cannot grow a
    block in place, so a growing block takes its whole size from its start. No size classes,
    no rounding, no segments: the baseline a planner must beat with foresight.

    >>> simulate_best_fit([Block(id="a", size=4, start=0, end=2), Block(id="b", size=2,
    ...                    start=0, end=3), Block(id="c", size=3, start=2, end=3)]).offsets
    {'a': 0, 'b': 4, 'c': 0}
    """
    began = time.perf_counter()
    blocks = list(blocks)
    check_unique_ids(blocks)
    offsets: dict[BlockId, int] = {b.id: 0 for b in blocks}
    events = sorted((step, kind, i) for i, b in enumerate(blocks) if not b.is_trivial
                    for step, kind in ((b.start, 1), (b.end, 0)))
    live: list[tuple[int, int, int]] = []  # (offset, bytes, index), by offset
    for _, kind, i in events:
        b = blocks[i]
        if kind == 0:
            live.remove((offsets[b.id], b.top, i))
            continue
        best: tuple[int, int] | None = None  # (gap bytes, offset)
        at = 0
        for offset, nbytes, _ in live:
            if offset - at >= b.top and (best is None or offset - at < best[0]):
                best = (offset - at, at)
            at = max(at, offset + nbytes)
        offsets[b.id] = at if best is None else best[1]
        live.append((offsets[b.id], b.top, i))
        live.sort()
    peak = peak_of(blocks, offsets)
    bound = lower_bound(blocks)
    return Placement(offsets=offsets, peak=peak, lower_bound=bound, method="best-fit",
                     status="feasible", gap=(peak - bound) / peak if peak else 0.0,
                     seconds=time.perf_counter() - began)
