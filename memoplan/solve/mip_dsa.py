"""Dynamic storage allocation as a MIP, solved with python-mip's CBC.

This is the only module in memoplan that imports `mip`. The model (notation of the design
doc, sizes S_i and offsets A_i in units of ``unit`` bytes):

    minimise M
    peak[i]:        A_i + S_i <= M                              every block i
    nooverlap[i,j]: A_i + S_i <= A_j + U * (1 - z_ij)           pairs live at a common step
    nooverlap[j,i]: A_j + S_j <= A_i + U * z_ij                 (z_ij = 1: i lies below j)
    sym[i,j]:       A_i + S_i <= A_j                            identical blocks, i before j
    0 <= A_i <= U - S_i,  LB <= M <= U

(Models with many pairs give "j below i" a binary of its own; see `_add_nooverlap`.)

U is the peak of a known valid plan (greedy-by-size, or the caller's warm start if better,
then improved by `dsa.search_orders`), so big-M = U never cuts off an optimum, and LB is
`dsa.hole_bound`: the largest total of simultaneously live units, plus the holes growing blocks
leave that nothing else can fill. Two reductions keep an optimum (proofs at `_canonical`):
blocks that are live at a step shared with every other block ("universal") are pinned at the
bottom of the arena, stacked in input order, and identical blocks (same size, growth, start and
end) are ordered by input order.

The stages, each skipped once the plan meets LB (then it is optimal, and the result's ``note``
says what was skipped and why): the start plan; the order search (`SEARCH_SHARE` of the time
limit), which on level 2's traces finds what CBC does not; CBC on the rest of the time, unless
the instance has more than `CBC_MAX_BLOCKS` free blocks (then the search has all of it).

CBC runs in a process of its own (``_cbc_worker``): it is native code that can die of a signal,
and that must not end the caller's process (`_run_cbc`).

Status of the result: "optimal" (proved, or the plan met the lower bound), "feasible"
(time limit hit; ``gap`` says how far the bound is), or "greedy-fallback" (CBC gave nothing
usable, crashed or hung: the plan so far is returned and the note says why). ``method`` is
"mip" when the offsets come from CBC, "search" when from the order search, else the start
plan's method ("greedy" or the warm start's). ``stages`` gives the peak after each stage that ran.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import re
import signal
import subprocess
import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from itertools import accumulate
from pathlib import Path

try:
    import mip
    MIP_MISSING = ""
except Exception as e:  # noqa: BLE001  (no wheel or no CBC binary for this platform)
    mip = None
    MIP_MISSING = f"{type(e).__name__}: {e}"

from memoplan.errors import MemoplanError
from memoplan.solve.dsa import (
    Block,
    BlockId,
    Placement,
    check_unique_ids,
    conflicting_pairs,
    first_fit,
    greedy_offsets,
    hole_bound,
    lower_bound,
    peak_of,
    search_orders,
)
from memoplan.units import fmt_bytes

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (best_peak_bytes, bound_bytes)

SPLIT_BINARY_PAIRS = 8000  # more overlapping pairs than this: two binaries per pair
# CBC checks its limit against CPU time and only after presolve and the warm start's
# evaluation, which take seconds on models with 100k binaries: it gets this share of the
# time left, the rest covers its overrun.
CBC_SHARE = 0.8
SEARCH_SHARE = 0.5  # of the time limit, for the order search before CBC
# Free blocks above which CBC is not run and the order search gets its time: on the 7B
# profiles' level-2 iterations (500-690 blocks) CBC never lowered a peak, after the search or
# from the same start alone (benchmarks/results/mip_ablation.md); it did on 26-61 blocks.
CBC_MAX_BLOCKS = 300
CBC_GRACE = 60.0  # seconds past its limit before CBC's process is taken for hung and killed


@dataclass(frozen=True, kw_only=True)
class _Problem:
    """The instance in units, with the structure the reductions need."""

    blocks: list[Block]  # sizes in units, input order, same ids as the caller's blocks
    unit: int  # bytes per unit
    bound: int  # units: lower bound on the peak (hole_bound, and the largest block)
    universal: list[int]  # indices of blocks live at a step shared with every other block
    groups: list[list[int]]  # indices of identical non-universal blocks, 2 or more each
    names: dict[BlockId, str]  # block id -> its unique name in the model

    @property
    def floor(self) -> int:
        """Units taken by the pinned universal blocks at the bottom of the arena."""
        return sum(self.blocks[i].size for i in self.universal)


@dataclass(frozen=True, kw_only=True)
class _Start:
    """A valid plan in units that the MIP starts from and must beat."""

    offsets: dict[BlockId, int]  # units
    peak: int  # units
    method: str


@dataclass(frozen=True, kw_only=True)
class _CbcResult:
    """What CBC ended with, as its process hands it back."""

    status: str  # mip.OptimizationStatus's name
    offsets: dict[BlockId, int] | None  # units, the free blocks' (None: no plan)
    objective_bound: float  # units


def solve_mip(
    blocks: Sequence[Block],
    *,
    time_limit: float = 30.0,
    warm_start: Placement | None = None,
    unit: int | None = None,
    on_progress: ProgressFn | None = None,
    search: bool = True,
    cbc_max_blocks: float | None = None,
) -> Placement:
    """Place blocks with the least peak found within `time_limit` seconds.

    `unit` (bytes) is the granularity of offsets: by default the gcd of the sizes; a larger
    one (an alignment) rounds sizes up to whole units. `warm_start` is a valid plan for the
    blocks (in bytes; realigned to the unit when it is off the grid); the better of it and
    greedy-by-size starts the search (`search=False` skips the order search: CBC alone).
    Above `cbc_max_blocks` free blocks (default `CBC_MAX_BLOCKS`) CBC does not run and the
    order search gets the whole limit, as it does without python-mip.
    `on_progress(best_peak_bytes, bound_bytes)` is called before and after each stage, not
    during CBC: CBC's own progress callback (python-mip's ``store_search_progress_log``)
    crashes this CBC build with SIGSEGV. Never returns a plan worse than greedy-by-size on the
    same units. The order search gets `SEARCH_SHARE` of the limit; building the model counts
    against the limit (a build that outlasts it falls back to the plan so far); CBC gets
    `CBC_SHARE` of what is left, as it overruns its limit.

    >>> from memoplan.solve.dsa import Block
    >>> plan = solve_mip([Block(id="a", size=512, start=0, end=2),
    ...                   Block(id="b", size=1024, start=1, end=3)], time_limit=5)
    >>> plan.peak, plan.status, plan.note
    (1536, 'optimal', 'greedy meets the lower bound (1.50 KiB): no search, no MIP')
    """
    began = time.perf_counter()
    blocks = list(blocks)
    check_unique_ids(blocks)
    _check_options(time_limit, unit)
    problem = _problem(blocks, unit or _gcd_unit(blocks))
    start = _start_plan(problem, blocks, warm_start)
    stages = [_stage("start", blocks, problem, start, began)]

    def report(plan: _Start) -> None:
        if on_progress is not None:
            on_progress(_peak_bytes(blocks, plan.offsets, problem.unit),
                        problem.bound * problem.unit)

    report(start)
    if start.peak <= problem.bound:
        return _placement(blocks, problem, start.offsets, start.method, "optimal", 0.0, began,
                          note=f"{start.method} meets {_bound_text(problem)}: no search, no MIP",
                          stages=stages)
    free = len(_free_blocks(problem))
    too_many = free > (CBC_MAX_BLOCKS if cbc_max_blocks is None else cbc_max_blocks)
    share = SEARCH_SHARE if mip is not None and not too_many else 1.0  # no CBC: all of it
    if search:
        start = _searched(problem, start, deadline=began + share * time_limit)
        stages.append(_stage("search", blocks, problem, start, began))
        report(start)
        if start.peak <= problem.bound:
            return _placement(blocks, problem, start.offsets, start.method, "optimal", 0.0,
                              began, note=f"the order search meets {_bound_text(problem)}: no MIP",
                              stages=stages)
    if mip is None:
        log.warning("solve_mip: python-mip cannot be imported (%s); keeping the plan so far",
                    MIP_MISSING)
        return _fallback(blocks, problem, start, began, stages,
                         "python-mip cannot be imported: plan so far kept, no MIP")
    if too_many:
        return _placement(blocks, problem, start.offsets, start.method, "feasible",
                          (start.peak - problem.bound) / start.peak, began, stages=stages,
                          note=f"{free} blocks, more than CBC has lowered a peak on: no MIP, "
                               f"the order search had the whole time limit")
    result = _run_cbc(problem, start, seconds=began + time_limit - time.perf_counter())
    if isinstance(result, str):
        log.warning("solve_mip: %s", result)
        return _fallback(blocks, problem, start, began, stages, result)
    placement, bound = _read_result(blocks, problem, start, result, began, stages)
    if on_progress is not None:
        on_progress(placement.peak, bound * problem.unit)
    return placement


def _bound_text(problem: _Problem) -> str:
    """The bound the plan met, in words, for a placement's note."""
    return f"the lower bound ({fmt_bytes(problem.bound * problem.unit)})"


def _stage(name: str, blocks: list[Block], problem: _Problem, plan: _Start,
           began: float) -> tuple[str, int, float]:
    """(stage, peak in bytes, seconds since `began`) for `Placement.stages`."""
    return name, _peak_bytes(blocks, plan.offsets, problem.unit), time.perf_counter() - began


def _searched(problem: _Problem, start: _Start, *, deadline: float) -> _Start:
    """The start plan improved by `dsa.search_orders`, in canonical form; the start plan
    itself (same method) when the search finds nothing lower."""
    found = _canonical(problem, search_orders(problem.blocks, start.offsets,
                                              target=problem.bound, deadline=deadline))
    peak = peak_of(problem.blocks, found)
    if peak >= start.peak:
        return start
    return _Start(offsets=found, peak=peak, method="search")


def _check_options(time_limit: float, unit: int | None) -> None:
    """Reject options the solver cannot use, naming the option."""
    if not time_limit > 0:
        raise MemoplanError(f"solve_mip: time_limit must be > 0 seconds, got {time_limit!r}.")
    if unit is not None and (isinstance(unit, bool) or not isinstance(unit, int) or unit <= 0):
        raise MemoplanError(f"solve_mip: unit must be a positive int (bytes), got {unit!r}.")


def _gcd_unit(blocks: Sequence[Block]) -> int:
    """Largest unit that divides every size and growth (1 when all are 0)."""
    return reduce(math.gcd, (n for b in blocks for n in (b.size, b.grow) if n), 0) or 1


def _problem(blocks: list[Block], unit: int) -> _Problem:
    """Scale sizes to units (rounding up) and find the universal and identical blocks."""
    scaled = [_scaled(b, unit) for b in blocks]
    active = [i for i, b in enumerate(scaled) if not b.is_trivial]
    grow_steps = [b.grow_at for b in scaled if b.grow and not b.is_trivial]
    universal = [i for i in _universal(scaled, active)  # live when every block grows: not
                 if not scaled[i].grow and scaled[i].end > max(grow_steps, default=-1)]  # in a hole
    pinned = set(universal)
    by_key: dict[tuple[int, ...], list[int]] = {}
    for i in active:
        if i not in pinned:
            b = scaled[i]
            by_key.setdefault((b.size, b.grow, b.grow_at, b.grows_down, b.start, b.end),
                              []).append(i)
    groups = [members for members in by_key.values() if len(members) > 1]
    bound = max([hole_bound(scaled)] + [b.top for b in scaled])  # every block fits under M
    return _Problem(
        blocks=scaled,
        unit=unit,
        bound=bound,
        universal=universal,
        groups=groups,
        names=_names(scaled),
    )


def _scaled(block: Block, unit: int) -> Block:
    """`block` in units, holding at least its bytes at every step: sizes round up; for a block
    that grows down, its top rounds up and its growth down, so that its early part, the last
    bytes, stays inside the last units."""
    if not block.grows_down:
        return dataclasses.replace(block, size=-(-block.size // unit), grow=-(-block.grow // unit))
    grow = block.grow // unit
    return dataclasses.replace(block, size=-(-block.top // unit) - grow, grow=grow,
                               grows_down=bool(grow))


def _universal(blocks: list[Block], active: list[int]) -> list[int]:
    """Indices of active blocks whose lifetime overlaps that of every other active block."""
    ends = sorted((blocks[i].end, i) for i in active)[:2]
    starts = sorted(((blocks[i].start, i) for i in active), reverse=True)[:2]
    found = []
    for i in active:
        min_end = next((end for end, j in ends if j != i), math.inf)
        max_start = next((start for start, j in starts if j != i), -math.inf)
        if blocks[i].start < min_end and max_start < blocks[i].end:
            found.append(i)
    return found


def _start_plan(problem: _Problem, blocks: list[Block], warm_start: Placement | None) -> _Start:
    """The better of greedy-by-size and the warm start, in canonical form (see `_canonical`)."""
    greedy = _canonical(problem, greedy_offsets(problem.blocks))
    best = _Start(offsets=greedy, peak=peak_of(problem.blocks, greedy), method="greedy")
    if warm_start is not None:
        warm = _canonical(problem, _warm_offsets(problem, blocks, warm_start))
        warm_peak = peak_of(problem.blocks, warm)
        if warm_peak < best.peak:
            best = _Start(offsets=warm, peak=warm_peak, method=warm_start.method)
    return best


def _warm_offsets(
    problem: _Problem, blocks: list[Block], warm_start: Placement
) -> dict[BlockId, int]:
    """The warm start's offsets in units.

    A warm start that is valid in bytes but not on the unit grid (offsets not multiples of the
    unit, or clashing once sizes round up) is realigned: its blocks are placed again, first-fit
    in the order of its offsets. MemoplanError when it is no valid plan for `blocks`.
    """
    missing = [b.id for b in blocks if b.id not in warm_start.offsets]
    if missing:
        raise MemoplanError(f"solve_mip: warm_start has no offsets for blocks {missing!r}.")
    offsets = {b.id: warm_start.offsets[b.id] for b in blocks}
    negative = [block_id for block_id, offset in offsets.items() if offset < 0]
    clash = _first_clash(blocks, offsets)
    if negative or clash is not None:
        raise MemoplanError(
            f"solve_mip: warm_start is not a valid plan (negative offsets for {negative!r}, "
            f"overlapping blocks {clash!r}); pass a checked Placement or none."
        )
    unit = problem.unit
    if all(offset % unit == 0 for offset in offsets.values()):
        in_units = {block_id: offset // unit for block_id, offset in offsets.items()}
        if _first_clash(problem.blocks, in_units) is None:
            return in_units
    return first_fit(problem.blocks, sorted(blocks, key=lambda b: offsets[b.id]))


def _first_clash(blocks: list[Block], offsets: dict[BlockId, int]) -> tuple | None:
    """Ids of the first two blocks live together at overlapping addresses, or None."""
    order = sorted((b for b in blocks if not b.is_trivial), key=lambda b: b.start)
    live: list[Block] = []
    for block in order:
        live = [other for other in live if other.end > block.start]
        for other in live:
            if not (offsets[block.id] + block.below(other) <= offsets[other.id]
                    or offsets[other.id] + other.below(block) <= offsets[block.id]):
                return other.id, block.id
        live.append(block)
    return None


def _canonical(problem: _Problem, offsets: dict[BlockId, int]) -> dict[BlockId, int]:
    """Move a valid plan into the form the model's reductions demand, without raising its peak.

    1. Universal blocks to the bottom, stacked in input order; every other block p moves to
       floor + A_p - (units of universal blocks below p). Valid: each universal block u is live
       together with every p, so p lies wholly below or above u (a growing p too, grown: only
       blocks still live when every growing block grows are pinned, so none sits in a hole);
       for p below q (both live at a common step) the gap between them only loses the universal
       blocks that sat inside it, and A_p + S_p + (universal units above p) <= M keeps the peak.
    2. Identical blocks: hand the group's offsets, sorted, to its members in input order.
       Swapping identical blocks' offsets never changes which bytes are used at which step
       (growing ones included: they grow at the same step).
    Trivial blocks (size 0 or empty lifetime) go to offset 0.
    """
    blocks = problem.blocks
    result = {b.id: 0 for b in blocks}
    floor = 0
    for i in problem.universal:
        result[blocks[i].id] = floor
        floor += blocks[i].size
    pinned = sorted(  # (top, size) of each universal block in the given plan
        (offsets[blocks[i].id] + blocks[i].size, blocks[i].size) for i in problem.universal
    )
    tops = [top for top, _ in pinned]
    units_up_to = list(accumulate((size for _, size in pinned), initial=0))
    universal = set(problem.universal)
    for i, block in enumerate(blocks):
        if not block.is_trivial and i not in universal:
            offset = offsets[block.id]
            result[block.id] = floor + offset - units_up_to[bisect_right(tops, offset)]
    for members in problem.groups:
        values = sorted(result[blocks[i].id] for i in members)
        for i, value in zip(members, values, strict=True):
            result[blocks[i].id] = value
    return result


def _names(blocks: list[Block]) -> dict[BlockId, str]:
    """Each block's id as it appears in variable and constraint names: MPS-safe characters,
    and unique (CBC matches warm-start values to variables by name), so an id that collides
    after cleaning gets its input position appended, e.g. ``a_b~3``."""
    names: dict[BlockId, str] = {}
    used: set[str] = set()
    for index, block in enumerate(blocks):
        name = re.sub(r"[^A-Za-z0-9_.#:-]", "_", str(block.id))
        while name in used:
            name = f"{name}~{index}"
        names[block.id] = name
        used.add(name)
    return names


def _build_model(
    problem: _Problem, start: _Start, *, deadline: float = math.inf
) -> tuple[mip.Model, dict[BlockId, mip.Var]] | None:
    """The DSA model for the blocks the reductions leave free, warm-started from `start`.

    None when the clock (``time.perf_counter``) passes `deadline` before the model is built.
    """
    model = mip.Model(name="dsa", sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    model.max_mip_gap = 0.0
    model.max_mip_gap_abs = 0.999  # M is integral: a gap below one unit proves optimality
    # Cuts barely move the bound of big-M disjunctions, and feasibility emphasis finds better
    # plans sooner: on 40 random 15-25 block traces this pair solved 3x faster than CBC's
    # defaults, and it keeps CBC's time-limit overrun to a fraction of a second.
    model.cuts = 0
    model.emphasis = mip.SearchEmphasis.FEASIBILITY
    offsets = _add_offsets(model, problem, start)
    peak = model.add_var("peak", var_type=mip.INTEGER, lb=problem.bound, ub=start.peak)
    model.objective = mip.minimize(peak)
    _add_peak(model, problem, offsets, peak)
    below = _add_nooverlap(model, problem, offsets, start.peak, deadline)
    if below is None:
        return None
    _add_symmetry(model, problem, offsets)
    if time.perf_counter() > deadline:
        return None
    model.start = _start_values(problem, start, offsets, below, peak)
    return model, offsets


def _free_blocks(problem: _Problem) -> list[int]:
    """Indices of the blocks whose offset the MIP decides (not trivial, not universal)."""
    pinned = set(problem.universal)
    return [i for i, b in enumerate(problem.blocks) if not b.is_trivial and i not in pinned]


def _add_offsets(model: mip.Model, problem: _Problem, start: _Start) -> dict[BlockId, mip.Var]:
    """offset[i] = A_i, integer in units, floor <= A_i <= U - S_i (universal blocks below)."""
    offsets = {}
    for i in _free_blocks(problem):
        block = problem.blocks[i]
        offsets[block.id] = model.add_var(
            f"offset[{problem.names[block.id]}]",
            var_type=mip.INTEGER,
            lb=problem.floor,
            ub=start.peak - block.top,
        )
    return offsets


def _add_peak(
    model: mip.Model, problem: _Problem, offsets: dict[BlockId, mip.Var], peak: mip.Var
) -> None:
    """peak[i]: A_i + S_i <= M for every free block (pinned ones fit under LB <= M)."""
    for i in _free_blocks(problem):
        block = problem.blocks[i]
        model.add_constr(
            mip.LinExpr([offsets[block.id], peak], [1, -1]) <= -block.top,
            name=f"peak[{problem.names[block.id]}]",
        )


def _conflicting_pairs(problem: _Problem) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of free blocks live at a common step that the model must separate.

    Pairs inside one group of identical blocks are left to `_add_symmetry`.
    """
    group_of = {i: g for g, members in enumerate(problem.groups) for i in members}
    free = _free_blocks(problem)
    pairs = conflicting_pairs([problem.blocks[i] for i in free])
    return sorted((min(free[a], free[b]), max(free[a], free[b])) for a, b in pairs
                  if group_of.get(free[a], -1) != group_of.get(free[b], -2))


def _add_nooverlap(
    model: mip.Model,
    problem: _Problem,
    offsets: dict[BlockId, mip.Var],
    big_m: int,
    deadline: float,
) -> dict[tuple[int, int], mip.Var] | None:
    """For blocks i, j live at a common step, with z_ij = below[i,j] binary:

    nooverlap[i,j]: A_i + S_i <= A_j + U * (1 - z_ij)
    nooverlap[j,i]: A_j + S_j <= A_i + U * z_ij

    Above SPLIT_BINARY_PAIRS pairs, "j below i" gets a binary of its own, z_ji = below[j,i]:
    nooverlap[j,i]: A_j + S_j <= A_i + U * (1 - z_ji) and order[i,j]: z_ij + z_ji = 1. The same
    model, without the parallel row pairs whose detection in CBC's presolve grows with the
    square of their number (8 s for 26k pairs, before the time limit is ever checked).
    Returns the binaries by (lower, upper) block index; None when `deadline` passes first.
    """
    pairs = _conflicting_pairs(problem)
    split = len(pairs) > SPLIT_BINARY_PAIRS
    below: dict[tuple[int, int], mip.Var] = {}
    for count, (i, j) in enumerate(pairs):
        if count % 1024 == 0 and time.perf_counter() > deadline:
            return None
        below.update(_add_pair(model, problem, offsets, big_m, (i, j), split=split))
    return below


def _add_pair(
    model: mip.Model,
    problem: _Problem,
    offsets: dict[BlockId, mip.Var],
    big_m: int,
    pair: tuple[int, int],
    *,
    split: bool,
) -> dict[tuple[int, int], mip.Var]:
    """The disjunction for one pair (see `_add_nooverlap`); its binaries by (lower, upper)."""
    i, j = pair
    a, b = problem.blocks[i], problem.blocks[j]
    name_a, name_b = problem.names[a.id], problem.names[b.id]
    a_var, b_var = offsets[a.id], offsets[b.id]
    z = model.add_var(f"below[{name_a},{name_b}]", var_type=mip.BINARY)
    model.add_constr(
        mip.LinExpr([a_var, b_var, z], [1, -1, big_m]) <= big_m - a.below(b),
        name=f"nooverlap[{name_a},{name_b}]",
    )
    if not split:
        model.add_constr(
            mip.LinExpr([b_var, a_var, z], [1, -1, -big_m]) <= -b.below(a),
            name=f"nooverlap[{name_b},{name_a}]",
        )
        return {(i, j): z}
    z_back = model.add_var(f"below[{name_b},{name_a}]", var_type=mip.BINARY)
    model.add_constr(
        mip.LinExpr([b_var, a_var, z_back], [1, -1, big_m]) <= big_m - b.below(a),
        name=f"nooverlap[{name_b},{name_a}]",
    )
    model.add_constr(mip.LinExpr([z, z_back], [1, 1]) == 1, name=f"order[{name_a},{name_b}]")
    return {(i, j): z, (j, i): z_back}


def _add_symmetry(model: mip.Model, problem: _Problem, offsets: dict[BlockId, mip.Var]) -> None:
    """sym[i,j]: A_i + S_i <= A_j for consecutive identical blocks i, j (input order); S_i is
    what i holds once grown (identical blocks are live together when they grow)."""
    for members in problem.groups:
        for i, j in zip(members, members[1:]):
            a, b = problem.blocks[i], problem.blocks[j]
            model.add_constr(
                mip.LinExpr([offsets[a.id], offsets[b.id]], [1, -1]) <= -a.below(b),
                name=f"sym[{problem.names[a.id]},{problem.names[b.id]}]",
            )


def _start_values(
    problem: _Problem,
    start: _Start,
    offsets: dict[BlockId, mip.Var],
    below: dict[tuple[int, int], mip.Var],
    peak: mip.Var,
) -> list[tuple[mip.Var, float]]:
    """Values of every variable in the start plan (below[i,j] = 1 where i lies below j)."""
    values = [(var, start.offsets[block_id]) for block_id, var in offsets.items()]
    values.append((peak, start.peak))
    for (i, j), z in below.items():
        a, b = problem.blocks[i], problem.blocks[j]
        values.append((z, 1 if start.offsets[a.id] + a.below(b) <= start.offsets[b.id] else 0))
    return values


def _run_cbc(problem: _Problem, start: _Start, *, seconds: float) -> _CbcResult | str:
    """CBC on the model of `problem`, warm-started from `start`, within `seconds` (building
    the model included), in a process of its own (``memoplan.solve._cbc_worker``); a string
    saying why there is no result when there is none.

    CBC is native code and can die of a signal: seen here, SIGABRT from its crash handler
    after a fault in ``CglPreProcess::postProcess`` when its time ran out in preprocessing,
    3 runs in 40 on llama7b's 1M/8 level 2 at 1.2-3.5 s. In this process that would end the user's
    `memoplan solve` (or their script, or a test run) with no plan; in its own, the plan so far
    is kept and the note says what happened."""
    if seconds <= 0:
        return "building the MIP used the whole time limit: plan so far kept"
    payload = pickle.dumps((problem, start, time.time() + seconds))
    wait = max(2 * seconds, seconds + CBC_GRACE)  # CBC overruns its limit a little
    try:
        done = subprocess.run(_worker_command(), input=payload, capture_output=True,
                              timeout=wait)
    except subprocess.TimeoutExpired:
        return f"CBC did not stop within {wait:.0f} s of its {seconds:.1f} s limit: killed, " \
               f"plan so far kept"
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip()
        if done.returncode < 0:
            log.debug("CBC's process printed: %s", said[-2000:])
            return f"CBC crashed ({_signal_name(-done.returncode)}): plan so far kept"
        log.warning("solve_mip: CBC's process failed: %s", said[-2000:])
        last = said.splitlines()[-1] if said else "nothing on stderr"
        return f"CBC's process failed (exit code {done.returncode}: {last}): plan so far kept"
    try:
        result = pickle.loads(done.stdout)
    except Exception:  # noqa: BLE001  (anything unreadable is no result)
        return "CBC's process handed back no readable result: plan so far kept"
    return result if isinstance(result, _CbcResult | str) else \
        "CBC's process handed back no readable result: plan so far kept"


def _signal_name(number: int) -> str:
    try:
        return f"signal {signal.Signals(number).name}"
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"


def _worker_command() -> list[str]:
    """The command that runs `cbc_in_this_process` on a pickled (problem, start, deadline):
    this memoplan's worker, imported from this checkout or installation (its folder first on
    the path unless it is there already, as site-packages is), with nothing from the caller's
    current directory on the path (a ``pickle.py`` or ``mip/`` there would be imported
    instead)."""
    root = str(Path(__file__).resolve().parents[2])
    setup = ("import sys; sys.path.pop(0); r = " + repr(root) +
             "; r in sys.path or sys.path.insert(0, r); "
             "from memoplan.solve._cbc_worker import main; main()")
    return [sys.executable, "-c", setup]


def cbc_in_this_process(problem: _Problem, start: _Start, deadline: float) -> _CbcResult | str:
    """Build the model and run CBC until `deadline` (``time.time()``), in this process: what
    ``_cbc_worker`` runs (`_run_cbc` says why not in the caller's process). CBC gets
    `CBC_SHARE` of the time the build leaves, as it overruns its limit."""
    began = time.perf_counter()
    seconds = deadline - time.time()
    built = _build_model(problem, start, deadline=began + seconds)
    remaining = began + seconds - time.perf_counter()
    if built is None or remaining <= 0:
        return "building the MIP used the whole time limit: plan so far kept"
    model, offsets = built
    status = model.optimize(max_seconds=CBC_SHARE * remaining)
    found = None
    if status in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        found = {block_id: round(var.x) for block_id, var in offsets.items()}
    return _CbcResult(status=status.name, offsets=found, objective_bound=model.objective_bound)


def _read_result(
    blocks: list[Block],
    problem: _Problem,
    start: _Start,
    result: _CbcResult,
    began: float,
    stages: list[tuple[str, int, float]],
) -> tuple[Placement, int]:
    """The better of CBC's plan and the start plan, and the bound on the peak (units).

    The start plan, marked "greedy-fallback", when CBC returned no usable plan.
    """
    if result.offsets is None:
        log.warning("solve_mip: CBC ended with %s and no plan; keeping the start plan",
                    result.status)
        return _fallback(blocks, problem, start, began, stages,
                         f"CBC ended with {result.status} and no plan: plan so far kept"
                         ), problem.bound
    found = dict(start.offsets)
    found.update(result.offsets)
    clash = _first_clash(problem.blocks, found)
    if clash is not None or min(found.values(), default=0) < 0:
        log.warning("solve_mip: CBC's plan is invalid (clash %s); keeping the start plan", clash)
        return _fallback(blocks, problem, start, began, stages,
                         "CBC's plan was invalid: plan so far kept"), problem.bound
    found_peak = peak_of(problem.blocks, found)
    best, best_peak, method = start.offsets, start.peak, start.method
    if found_peak < start.peak:
        best, best_peak, method = found, found_peak, "mip"
    bound = max(problem.bound, math.ceil(result.objective_bound - 1e-6))
    if result.status == "OPTIMAL":
        bound = max(bound, found_peak)
    bound = min(bound, best_peak)
    gap = (best_peak - bound) / best_peak
    status_text = "optimal" if gap == 0 else "feasible"
    stages = stages + [_stage("mip", blocks, problem,
                              _Start(offsets=best, peak=best_peak, method=method), began)]
    note = (f"CBC {'proved' if gap == 0 else 'ran out of time at'} "
            f"{'the optimum' if gap == 0 else f'a gap of {gap:.2%} to its bound'}; "
            f"{'it lowered the peak' if method == 'mip' else 'it found no lower peak'}")
    return _placement(blocks, problem, best, method, status_text, gap, began, note=note,
                      stages=stages), bound


def _fallback(blocks: list[Block], problem: _Problem, start: _Start, began: float,
              stages: list[tuple[str, int, float]], note: str) -> Placement:
    """The start plan, marked "greedy-fallback", with its gap to the lower bound."""
    gap = (start.peak - problem.bound) / start.peak
    return _placement(blocks, problem, start.offsets, start.method, "greedy-fallback", gap, began,
                      note=note, stages=stages)


def _peak_bytes(blocks: list[Block], offsets: dict[BlockId, int], unit: int) -> int:
    """Arena bytes the plan needs: max of offset + size in bytes."""
    return max((offsets[b.id] * unit + b.top for b in blocks), default=0)


def _placement(
    blocks: list[Block],
    problem: _Problem,
    offsets: dict[BlockId, int],
    method: str,
    status: str,
    gap: float,
    began: float,
    *,
    note: str,
    stages: Sequence[tuple[str, int, float]],
) -> Placement:
    """A Placement in bytes from offsets in units."""
    return Placement(
        offsets={b.id: offsets[b.id] * problem.unit for b in blocks},
        peak=_peak_bytes(blocks, offsets, problem.unit),
        lower_bound=lower_bound(blocks),
        method=method,
        status=status,
        gap=gap,
        seconds=time.perf_counter() - began,
        note=note,
        stages=tuple(stages),
    )
