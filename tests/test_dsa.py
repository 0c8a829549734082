"""The DSA solvers and the checker: hand-made traces with optima proved in comments, property
tests against the checker and against brute force, the checker's own failures, bad traces, and
the solver's time-limit and fallback paths."""

from __future__ import annotations

import dataclasses
import itertools
import random
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES
from memoplan.errors import MemoplanError
from strategies import request_traces
from memoplan.solve import mip_dsa
from memoplan.solve.check import PlanCheckError, check_placement
from memoplan.solve.dsa import (
    Block,
    Placement,
    blocks_from_requests,
    first_fit,
    hole_bound,
    lower_bound,
    lowest_fit,
    peak_of,
    search_orders,
    simulate_best_fit,
    solve_greedy,
)
from memoplan.solve.mip_dsa import solve_mip

STATUSES = {"optimal", "feasible", "greedy-fallback"}


def block(block_id: int | str, size: int, start: int, end: int) -> Block:
    return Block(id=block_id, size=size, start=start, end=end)


def plan(offsets: dict, peak: int, lower: int) -> Placement:
    return Placement(offsets=offsets, peak=peak, lower_bound=lower, method="hand",
                     status="feasible", gap=0.0, seconds=0.0)


def brute_force_optimum(blocks: list[Block]) -> int:
    """Least peak over first-fit placements in every order.

    Some order reaches the optimum: place blocks in the order of an optimal plan's offsets;
    by induction each lands at or below its optimal offset (the blocks placed before it lie
    below it in the optimal plan and were moved only down), so the peak is at most optimal.
    """
    best = None
    for order in itertools.permutations(blocks):
        offsets: dict = {}
        placed: list[Block] = []
        for b in order:
            offsets[b.id] = lowest_fit(b, placed, offsets)
            placed.append(b)
        peak = peak_of(blocks, offsets)
        best = peak if best is None else min(best, peak)
    return best or 0


def compacted_optimum(blocks: list[Block]) -> int:
    """Least peak over every plan whose blocks each lie at 0 or right on a block placed
    before it (its offset that block's plus `Block.below`), in every order.

    With blocks that grow down, first-fit in an optimal plan's order can miss it (a block that
    sits in a hole under another's copied tokens has a higher offset than the block below it
    in memory), so `brute_force_optimum` does not apply. But an optimal plan can be moved down
    block by block until each lies at 0 or right on another, and placing them in an order
    where each comes after the one it lies on gives that plan (when the "lies on" relation has
    no cycle, as in these small cases)."""
    best = None
    for order in itertools.permutations(blocks):
        stack = [(0, {})]
        while stack:
            k, offsets = stack.pop()
            if k == len(order):
                peak = peak_of(blocks, offsets)
                best = peak if best is None else min(best, peak)
                continue
            b = order[k]
            placed = [o for o in order[:k] if max(o.start, b.start) < min(o.end, b.end)]
            for x in {0} | {offsets[o.id] + o.below(b) for o in placed}:
                if x >= 0 and all(x + b.below(o) <= offsets[o.id] or
                                  offsets[o.id] + o.below(b) <= x for o in placed):
                    stack.append((k + 1, {**offsets, b.id: x}))
    return best or 0


# --- hand-made traces ---------------------------------------------------------------------

# A chain d - a - c - b of lifetimes (each overlaps only its neighbours), sizes 2, 1, 1, 2.
# Live bytes: step 1: d+a = 3, step 2: a+c = 2, step 3: c+b = 3, so the lower bound is 3.
# Greedy-by-size: d (2, earliest) at 0; b (2) at 0 (never live with d); a (1, longer) must
# clear d: 2; c must clear a [2,3) and b [0,2): 3. Peak 4.
# Optimum 3 (= lower bound): c at 0, b at 1, a at 2, d at 0: d [0,2) vs a [2,3), a vs c [0,1),
# c vs b [1,3) are all disjoint.
# Three blocks cannot show greedy-by-size losing: three intervals are pairwise live together
# (then they share a step and any stack is optimal) or form a path or less, where the larger
# end block at 0 and the middle one on top of it meets the lower bound.
CHAIN = [block("a", 1, 1, 3), block("b", 2, 3, 4), block("c", 1, 2, 4), block("d", 2, 1, 2)]


def test_greedy_loses_on_a_chain_and_the_mip_finds_the_optimum():
    greedy = solve_greedy(CHAIN)
    assert (greedy.peak, greedy.lower_bound, greedy.status) == (4, 3, "feasible")
    assert greedy.gap == pytest.approx(0.25)

    best = solve_mip(CHAIN, time_limit=10, search=False)  # CBC alone

    check_placement(CHAIN, best)
    assert (best.peak, best.status, best.method, best.gap) == (3, "optimal", "mip", 0.0)
    assert [stage for stage, _, _ in best.stages] == ["start", "mip"]

    found = solve_mip(CHAIN, time_limit=10)  # the order search finds it first: no MIP

    check_placement(CHAIN, found)
    assert (found.peak, found.status, found.method, found.gap) == (3, "optimal", "search", 0.0)
    assert [(stage, peak) for stage, peak, _ in found.stages] == [("start", 4), ("search", 3)]
    assert found.note == "the order search meets the lower bound (3 B): no MIP"


def test_optimum_equal_to_the_lower_bound_is_returned_without_a_mip(monkeypatch):
    # Steps: 0 malloc x(4) | 1 malloc y(2) | 2 free x | 3 malloc z(3) | 4 malloc w(1) | 5 free y
    # Live bytes: 4, 6, 2, 5, 6, 4: lower bound 6. Greedy puts x at 0, z at 0 (x is dead by
    # then), y at 4, w at 3: peak 6, so nothing can beat it and the MIP must not be built.
    requests = [["malloc", "x", 4], ["malloc", "y", 2], ["free", "x", 4], ["malloc", "z", 3],
                ["malloc", "w", 1], ["free", "y", 2]]
    blocks = blocks_from_requests(requests)
    assert lower_bound(blocks) == 6

    def must_not_build(*args, **kwargs):
        raise AssertionError("the MIP was built although greedy meets the lower bound")

    monkeypatch.setattr(mip_dsa, "_run_cbc", must_not_build)
    result = solve_mip(blocks, time_limit=5)

    check_placement(blocks, result)
    assert (result.peak, result.status, result.method, result.gap) == (6, "optimal", "greedy", 0)


# Four unit blocks p, q, r, s are live together over steps 3..5; live bytes never exceed 4, so
# the lower bound is 4. With fillers: step 0: p alone with f0 (3) | step 1: p, q with f1 (2) |
# step 7: q, r with f7 (2) | step 8: r alone with f8 (3).
# Suppose a plan of peak 4 (slots 0..3). Step 0: f0 needs 3 contiguous bytes, so p is at 0 or 3;
# step 8: likewise r. p and r are live together (steps 2..5), so by mirror symmetry p = 0 and
# r = 3. Step 1: f1 needs 2 contiguous bytes beside p and q, so q is at 1 or 3, and 3 is r's:
# q = 1. Step 7: q = 1 and r = 3 leave slots 0 and 2, not 2 contiguous bytes for f7.
# So the optimum is at least 5, and the MIP finds 5: fragmentation no plan can avoid.
UNAVOIDABLE = [
    block("p", 1, 0, 6), block("q", 1, 1, 8), block("r", 1, 2, 9), block("s", 1, 3, 7),
    block("f0", 3, 0, 1), block("f1", 2, 1, 2), block("f7", 2, 7, 8), block("f8", 3, 8, 9),
]


def test_optimum_strictly_above_the_lower_bound_is_proved():
    assert lower_bound(UNAVOIDABLE) == 4

    result = solve_mip(UNAVOIDABLE, time_limit=20)

    check_placement(UNAVOIDABLE, result)
    assert (result.peak, result.status, result.gap) == (5, "optimal", 0.0)
    assert brute_force_optimum(UNAVOIDABLE) == 5


def test_sizes_are_solved_in_units_of_their_gcd_and_offsets_stay_multiples():
    blocks = [block(b.id, b.size * 4096, b.start, b.end) for b in CHAIN]

    result = solve_mip(blocks, time_limit=10)

    check_placement(blocks, result)
    assert result.peak == 3 * 4096
    assert all(offset % 4096 == 0 for offset in result.offsets.values())


def test_an_explicit_unit_rounds_sizes_up_and_aligns_offsets():
    blocks = [block("a", 100, 0, 2), block("b", 700, 1, 3), block("c", 300, 2, 4)]

    result = solve_mip(blocks, time_limit=10, unit=512)

    check_placement(blocks, result)
    assert all(offset % 512 == 0 for offset in result.offsets.values())
    # a and b are live together, b and c too: b takes 2 units, a or c the 3rd.
    assert result.peak <= 2 * 512 + 300 and result.status == "optimal"


def test_identical_blocks_and_a_universal_block_keep_the_optimum():
    # "big" is live together with every other block (it is pinned at 0); the two copies of
    # (2, [1, 3)) are ordered. Brute force confirms that the optimum survives both.
    blocks = [block("big", 5, 0, 6)] + [block(f"copy{i}", 2, 1, 3) for i in range(2)] + [
        block("a", 1, 1, 4), block("b", 2, 3, 5), block("c", 1, 4, 6), block("d", 3, 0, 2)]

    result = solve_mip(blocks, time_limit=10)

    check_placement(blocks, result)
    assert result.offsets["big"] == 0
    assert result.offsets["copy0"] < result.offsets["copy1"]
    assert result.status == "optimal"
    assert result.peak == brute_force_optimum(blocks)


def test_constraints_have_stable_readable_names():
    problem = mip_dsa._problem(CHAIN, 1)
    start = mip_dsa._start_plan(problem, CHAIN, None)
    model, _ = mip_dsa._build_model(problem, start)

    names = {constr.name for constr in model.constrs}

    # a-c and c-b overlap in time, and a-d: the only disjunctions; a peak row per free block.
    assert {"nooverlap[a,c]", "nooverlap[c,a]", "nooverlap[b,c]", "nooverlap[c,b]",
            "nooverlap[a,d]", "nooverlap[d,a]"} <= names
    assert {"peak[a]", "peak[b]", "peak[c]", "peak[d]"} <= names
    assert not any(name.startswith("nooverlap[a,b]") for name in names)  # never live together


def test_many_pairs_get_two_binaries_per_pair_and_the_same_optimum(monkeypatch):
    monkeypatch.setattr(mip_dsa, "SPLIT_BINARY_PAIRS", 0)
    problem = mip_dsa._problem(CHAIN, 1)
    model, _ = mip_dsa._build_model(problem, mip_dsa._start_plan(problem, CHAIN, None))

    names = {constr.name for constr in model.constrs}
    assert {"order[a,c]", "nooverlap[a,c]", "nooverlap[c,a]"} <= names
    assert {"below[a,c]", "below[c,a]"} <= {var.name for var in model.vars}
    for blocks, optimum in ((CHAIN, 3), (UNAVOIDABLE, 5)):
        result = solve_mip(blocks, time_limit=20)
        check_placement(blocks, result)
        assert (result.peak, result.status) == (optimum, "optimal")


def test_ids_that_clean_to_the_same_name_stay_apart():
    # CBC matches warm-start values by variable name: names must be unique after cleaning.
    ids = {"a": 1, "b": "1", "c": "x y", "d": "x_y"}
    blocks = [block(ids[b.id], b.size, b.start, b.end) for b in CHAIN]

    names = mip_dsa._problem(blocks, 1).names
    result = solve_mip(blocks, time_limit=10)

    assert len(set(names.values())) == 4
    check_placement(blocks, result)
    assert (result.peak, result.status) == (3, "optimal")


def test_progress_reports_best_and_bound_in_bytes():
    seen: list[tuple[int, int]] = []

    solve_mip(CHAIN, time_limit=10, on_progress=lambda best, bound: seen.append((best, bound)))

    assert seen[0] == (4, 3)  # greedy's peak, the lower bound
    assert seen[-1] == (3, 3)


def test_a_warm_start_better_than_greedy_is_kept():
    optimal = plan({"a": 2, "b": 1, "c": 0, "d": 0}, 3, 3)

    result = solve_mip(CHAIN, time_limit=10, warm_start=optimal)

    check_placement(CHAIN, result)
    assert (result.peak, result.status, result.method) == (3, "optimal", "hand")


def test_a_warm_start_off_the_unit_grid_is_realigned():
    blocks = [block("a", 1000, 0, 2), block("b", 1000, 1, 3)]
    warm = solve_greedy(blocks)  # b at 1000 bytes: not a multiple of 512

    result = solve_mip(blocks, time_limit=10, unit=512, warm_start=warm)

    check_placement(blocks, result)
    assert result.offsets == {"a": 0, "b": 1024}


def test_an_invalid_warm_start_is_refused():
    with pytest.raises(MemoplanError, match="warm_start is not a valid plan"):
        solve_mip(CHAIN, warm_start=plan({"a": 0, "b": 0, "c": 0, "d": 0}, 2, 3))
    with pytest.raises(MemoplanError, match="warm_start has no offsets for blocks"):
        solve_mip(CHAIN, warm_start=plan({"a": 0}, 1, 3))


def test_bad_solver_options_are_refused():
    with pytest.raises(MemoplanError, match="time_limit must be > 0"):
        solve_mip(CHAIN, time_limit=0)
    with pytest.raises(MemoplanError, match="unit must be a positive int"):
        solve_mip(CHAIN, unit=0)
    with pytest.raises(MemoplanError, match="block ids must be unique"):
        solve_mip([block("a", 1, 0, 1), block("a", 2, 0, 1)])


def test_empty_and_trivial_blocks():
    assert solve_mip([]).peak == 0 and solve_greedy([]).peak == 0
    # A block never live still needs offset + size <= peak: the peak is 8, not the live 4.
    blocks = [block("zero", 0, 0, 5), block("empty", 8, 3, 3), block("one", 4, 0, 5)]

    result = solve_mip(blocks)

    check_placement(blocks, result)
    assert (result.peak, result.lower_bound, result.status) == (8, 4, "optimal")


# --- time limit and fallback ----------------------------------------------------------------


def random_blocks(seed: int, n: int, steps: int) -> list[Block]:
    rng = random.Random(seed)
    blocks = []
    for i in range(n):
        start = rng.randrange(steps)
        blocks.append(block(i, 512 * rng.randint(1, 40), start,
                            min(steps, start + rng.randint(1, steps // 4))))
    return blocks


def test_time_limit_returns_a_checked_plan():
    blocks = random_blocks(seed=0, n=150, steps=60)

    result = solve_mip(blocks, time_limit=1)

    assert result.status in STATUSES
    check_placement(blocks, result)
    assert result.peak <= solve_greedy(blocks).peak
    assert result.seconds < 5
    assert 0 <= result.gap < 1


def test_a_limit_spent_on_building_the_model_falls_back_to_greedy():
    result = solve_mip(CHAIN, time_limit=1e-9)

    check_placement(CHAIN, result)
    assert (result.status, result.method, result.peak) == ("greedy-fallback", "greedy", 4)


def test_no_plan_from_cbc_falls_back_to_greedy(monkeypatch):
    monkeypatch.setattr(mip_dsa.mip.Model, "optimize",
                        lambda self, **kw: mip_dsa.mip.OptimizationStatus.NO_SOLUTION_FOUND)
    problem = mip_dsa._problem(CHAIN, 1)
    start = mip_dsa._start_plan(problem, CHAIN, None)
    ended = mip_dsa.cbc_in_this_process(problem, start, time.time() + 5)  # what the worker runs
    assert (ended.status, ended.offsets) == ("NO_SOLUTION_FOUND", None)
    monkeypatch.setattr(mip_dsa, "_run_cbc", lambda *a, **k: ended)

    result = solve_mip(CHAIN, time_limit=5, search=False)

    check_placement(CHAIN, result)
    assert (result.status, result.peak, result.gap) == ("greedy-fallback", 4, 0.25)
    assert "CBC ended with NO_SOLUTION_FOUND" in result.note


@pytest.mark.parametrize("child, why", [
    ("import os; os.abort()", "CBC crashed (signal SIGABRT)"),  # what CBC did, 1 run in 6
    ("import sys; sys.stderr.write('ImportError: no mip\\n'); sys.exit(3)",
     "CBC's process failed (exit code 3: ImportError: no mip)"),
    ("print('not a result')", "no readable result"),
    ("import time; time.sleep(30)", "CBC did not stop within"),
])
def test_cbc_dying_or_hanging_in_its_process_keeps_the_plan_so_far(monkeypatch, child, why):
    """CBC runs in a process of its own: when it dies of a signal (seen: SIGABRT from a fault in
    its preprocessing when its time ran out, which used to end the whole process, pytest with
    it), exits, prints garbage or hangs, the caller gets the plan so far and a note."""
    monkeypatch.setattr(mip_dsa, "_worker_command", lambda: [sys.executable, "-c", child])
    monkeypatch.setattr(mip_dsa, "CBC_GRACE", 1.0)

    result = solve_mip(CHAIN, time_limit=2, search=False)

    check_placement(CHAIN, result)
    assert (result.status, result.peak, result.method) == ("greedy-fallback", 4, "greedy")
    assert why in result.note and "plan so far kept" in result.note


def test_above_the_block_limit_cbc_does_not_run_and_the_search_gets_its_time(monkeypatch):
    monkeypatch.setattr(mip_dsa, "_run_cbc", lambda *a, **k: pytest.fail("CBC ran"))
    searched = []
    real = mip_dsa._searched
    monkeypatch.setattr(mip_dsa, "_searched", lambda problem, start, *, deadline: (
        searched.append(deadline), real(problem, start, deadline=deadline))[1])

    began = time.perf_counter()
    result = solve_mip(UNAVOIDABLE, time_limit=20, cbc_max_blocks=7)  # 8 blocks

    check_placement(UNAVOIDABLE, result)
    assert (result.peak, result.status) == (5, "feasible")  # the search's optimum, unproved
    assert result.note == "8 blocks, more than CBC has lowered a peak on: no MIP, the order " \
                          "search had the whole time limit"
    assert searched[0] > began + 0.9 * 20  # not SEARCH_SHARE of it
    assert [stage for stage, _, _ in result.stages] == ["start", "search"]


def test_cbcs_process_imports_nothing_from_the_callers_directory(monkeypatch, tmp_path):
    """``python -m`` would put the current directory first on the worker's path: a
    ``pickle.py`` or a ``mip/`` of the user's there turned CBC off."""
    (tmp_path / "pickle.py").write_text("raise ImportError('the one in the current directory')\n")
    (tmp_path / "mip").mkdir()
    (tmp_path / "mip" / "__init__.py").write_text("raise ImportError('not python-mip')\n")
    monkeypatch.chdir(tmp_path)

    result = solve_mip(CHAIN, time_limit=20, search=False)

    assert (result.peak, result.method, result.status) == (3, "mip", "optimal"), result.note


def test_cbc_runs_in_another_process_and_its_plan_comes_back(monkeypatch):
    monkeypatch.setattr(mip_dsa, "cbc_in_this_process",
                        lambda *a: pytest.fail("CBC ran in the caller's process"))

    result = solve_mip(CHAIN, time_limit=20, search=False)  # greedy: 4

    check_placement(CHAIN, result)
    assert (result.peak, result.method, result.status) == (3, "mip", "optimal")


# --- order search, hole bound, best fit, level-2 starts ---------------------------------------


def test_the_order_search_finds_the_chain_optimum_and_stops_at_the_target():
    greedy = solve_greedy(CHAIN)

    found = search_orders(CHAIN, greedy.offsets, target=3, deadline=time.perf_counter() + 10)

    check_placement(CHAIN, plan(found, peak_of(CHAIN, found), 3))
    assert peak_of(CHAIN, found) == 3
    # a target it already meets, or a deadline already past: the start's order, first-fit
    for kw in ({"target": 4, "deadline": time.perf_counter() + 10},
               {"target": 3, "deadline": time.perf_counter() - 1}):
        again = search_orders(CHAIN, greedy.offsets, **kw)
        assert again == first_fit(CHAIN, sorted(CHAIN, key=lambda b: greedy.offsets[b.id]))
        assert peak_of(CHAIN, again) <= greedy.peak


def test_the_order_search_is_deterministic_and_never_worse():
    blocks = random_blocks(seed=3, n=60, steps=30)
    greedy = solve_greedy(blocks)

    runs = [search_orders(blocks, greedy.offsets, target=0, deadline=time.perf_counter() + 60,
                          max_evals=3000, seed=7) for _ in range(2)]

    assert runs[0] == runs[1]
    check_placement(blocks, plan(runs[0], peak_of(blocks, runs[0]), greedy.lower_bound))
    assert peak_of(blocks, runs[0]) <= greedy.peak


# Two blocks hold 1 byte from step 0 and 5 bytes from step 2 on; a 10-byte block lives over
# steps 0..1 only. Live bytes: 12, 12, 10: lower bound 12. At step 0 the big block can cover
# one hole, not both (it would contain the head between them), so 4 bytes stay empty: 16. And
# 16 is reached: g at 0, f from 1 over g's hole, h at 11.
HOLES = [Block(id="g", size=1, start=0, end=3, grow=4, grow_at=2),
         Block(id="h", size=1, start=0, end=3, grow=4, grow_at=2), block("f", 10, 0, 2)]


def test_the_hole_bound_counts_holes_nothing_can_fill_and_proves_the_optimum(monkeypatch):
    assert (lower_bound(HOLES), hole_bound(HOLES)) == (12, 16)
    assert brute_force_optimum(HOLES) == 16
    assert hole_bound(CHAIN) == lower_bound(CHAIN)  # nothing grows

    monkeypatch.setattr(mip_dsa, "_run_cbc", lambda *a, **k: pytest.fail("MIP built"))
    result = solve_mip(HOLES, time_limit=10)

    check_placement(HOLES, result)
    assert (result.peak, result.status, result.gap) == (16, "optimal", 0.0)


def split_chain(layers: int, head: int, tail: int) -> list[Block]:
    """One split tensor per layer as level 2 has them in the backward (``levels``): layer k's
    copied tokens (`head` bytes) arrive while layer k+1 runs its backward, with its tokens all
    there (grown), and grow by the recomputed ones (`tail`) once layer k+1 is done."""
    return [Block(id=f"split[{k}]", size=head, start=2 * (layers - 1 - k),
                  end=2 * (layers - k) + 2, grow=tail, grow_at=2 * (layers - k))
            for k in range(layers)]


@pytest.mark.parametrize("layers, optimum", [(2, 4), (3, 5), (4, 6), (5, 6)])
def test_a_chain_of_split_tensors_needs_two_whole_tensors_however_the_holes_are_nested(
        layers, optimum):
    """Why every split tensor growing up leaves level 2 above the hole bound: it is not tight
    for chains. At every step one tensor is whole (N = head + tail) and the next holds its
    head, and the head's hole may take the whole one: per step N + head is enough (the hole
    bound). Across steps it is not: below a peak of 2N no tensor fits above a whole one, so
    each head lies below the whole tensor it meets, and the heads climb by `head` a layer:
    the peak is min(2N, N + (layers - 1) * head), reached by stacking two whole tensors once
    the chain has 1 + tail / head layers. Hence every second layer grows down (next test)."""
    chain = split_chain(layers, head=1, tail=2)
    assert hole_bound(chain) == lower_bound(chain) == 4
    assert brute_force_optimum(chain) == optimum == min(2 * 3, 3 + (layers - 1) * 1)
    assert compacted_optimum(chain) == optimum

    result = solve_mip(chain, time_limit=20)

    check_placement(chain, result)
    assert (result.peak, result.status) == (optimum, "optimal")  # CBC proves what the bound can't


@pytest.mark.parametrize("layers", [2, 3, 5, 8])
def test_a_chain_growing_up_and_down_in_turn_needs_one_whole_tensor_and_a_head(layers):
    """Every second layer's copied tokens are its last ones, its block growing down: its head
    lies right above the whole tensor of the layer after it, and grows down over it once that
    one is gone; the next layer's head lies at the bottom again. N + head at every step: the
    hole bound, which the chained start reaches and CBC proves."""
    from memoplan.solve.levels import chained_splits, chains

    chain = [dataclasses.replace(b, id=f"{b.id}:t", grows_down=(layers - 1 - k) % 2 == 1)
             for k, b in enumerate(split_chain(layers, head=1, tail=2))]
    assert hole_bound(chain) == 4
    if layers <= 3:
        assert compacted_optimum(chain) == 4
    assert [len(c) for c in chains(chain)] == [layers]

    chained = chained_splits(chain, layers)
    result = solve_mip(chain, time_limit=20)

    for placement in (chained, result):
        check_placement(chain, placement)
        assert placement.peak == 4
    assert result.status == "optimal"


def test_blocks_that_do_not_follow_each_other_as_in_the_backward_do_not_chain():
    """A chain's merged block holds its links only when each layer's copied tokens come as the
    layer above grows, and grow once it is gone (the review's counterexample: the lower layer's
    copied tokens there from the start would lie over a block dead before the upper grows)."""
    from memoplan.solve.levels import chained_splits, chains

    upper = Block(id="split[1]:t", size=1, start=0, end=4, grow=2, grow_at=2)
    lower = Block(id="split[0]:t", size=1, start=0, end=5, grow=2, grow_at=3, grows_down=True)
    assert chains([upper, lower, block("f", 3, 0, 2)]) == []
    assert chained_splits([upper, lower, block("f", 3, 0, 2)], 2) is None
    follows = dataclasses.replace(lower, start=2, grow_at=4, end=6)
    assert chains([upper, follows]) == [[upper, follows]]
    check_placement([upper, follows], chained_splits([upper, follows], 2))


def test_a_block_growing_down_holds_its_last_bytes_first():
    """A block that grows down holds [offset + grow, offset + top) until it grows: what lies
    there must be dead by its start or it must lie elsewhere, and its first bytes are free
    until it grows."""
    down = Block(id="d", size=2, start=0, end=4, grow=3, grow_at=2, grows_down=True)
    early = block("e", 3, 0, 2)  # dead when d grows: fits in d's first bytes
    assert down.span(early) == (3, 5) and down.span(block("x", 1, 0, 4)) == (0, 5)
    assert (down.below(early), early.below(down)) == (5, 0)  # e at or below d, or above it
    check_placement([down, early], plan({"d": 0, "e": 0}, 5, 5))
    with pytest.raises(PlanCheckError, match="overlapping addresses"):  # e over d's last bytes
        check_placement([down, early], plan({"d": 0, "e": 1}, 5, 5))
    up = dataclasses.replace(down, grows_down=False)
    with pytest.raises(PlanCheckError, match="overlapping addresses"):  # up: its first bytes
        check_placement([up, early], plan({"d": 0, "e": 0}, 5, 5))
    assert hole_bound([down, early]) == lower_bound([down, early]) == 5
    assert solve_mip([down, early], time_limit=5).peak == 5


def test_a_block_growing_down_keeps_its_last_bytes_in_its_last_units():
    """solve_mip in units of 4 bytes: a block growing down rounds its top up and its growth
    down, so that its last bytes (its copied tokens) stay in the units the model gives them."""
    down = Block(id="d", size=3, start=0, end=4, grow=6, grow_at=2, grows_down=True)
    early = block("e", 4, 0, 2)
    late = block("l", 4, 2, 4)

    result = solve_mip([down, early, late], time_limit=5, unit=4)

    check_placement([down, early, late], result)
    assert result.peak % 4 == 0


def test_solver_notes_say_what_ran():
    at_bound = solve_mip([block("a", 4, 0, 2), block("b", 4, 1, 3)], time_limit=5)
    assert at_bound.note == "greedy meets the lower bound (8 B): no search, no MIP"
    assert [stage for stage, _, _ in at_bound.stages] == ["start"]

    proved = solve_mip(UNAVOIDABLE, time_limit=20)  # the search finds 5, CBC proves it
    assert [(stage, peak) for stage, peak, _ in proved.stages][1:] == [("search", 5), ("mip", 5)]
    assert proved.note == "CBC proved the optimum; it found no lower peak"


def test_best_fit_takes_the_smallest_gap_and_cannot_grow_in_place():
    # a [0,4) and b [4,6) from step 0; a dies at 2; c (3) takes a's gap of 4 at step 2
    blocks = [block("a", 4, 0, 2), block("b", 2, 0, 3), block("c", 3, 2, 3),
              Block(id="g", size=1, start=1, end=3, grow=2, grow_at=2)]

    result = simulate_best_fit(blocks)

    check_placement(blocks, result)
    assert result.offsets == {"a": 0, "b": 4, "c": 0, "g": 6}  # g holds 3 bytes from step 1
    assert (result.peak, result.method) == (9, "best-fit")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 4), st.integers(1, 6),
                          st.integers(0, 3)), max_size=12))
def test_best_fit_plans_are_valid(specs):
    blocks = [block(i, size, start, start + length) for i, (start, length, size, _) in
              enumerate(specs)]

    result = simulate_best_fit(blocks)

    check_placement(blocks, result)
    assert result.peak >= lower_bound(blocks)


def _checkpointed_iteration() -> tuple[list[Block], int]:
    """Level 2 of Llama-7B at 1M tokens on 8 GPUs when host memory runs short (sizes in MiB as
    solve makes them): 1 offloaded layer, 25 checkpointed ones, the last kept."""
    from memoplan.ir import LayerDecision
    from memoplan.solve.levels import level2_blocks
    from memoplan.solve.swap import LayerBytes

    mib = 2**20
    modes = ["offload"] + ["recompute"] * 25 + ["keep"]
    decisions = [LayerDecision(index=i, mode=mode, alpha=0.013 if mode == "offload" else 0.0,
                               swapped_bytes=0, recomputed_bytes=0, host_bytes=0,
                               gpu_kept_bytes=0) for i, mode in enumerate(modes)]
    lb = LayerBytes(input=1024 * mib, mixing=0, fixed=0, token_wise=23313 * mib, shared=0)
    blocks = level2_blocks(decisions, lb, 15424 * mib, 31010 * mib, 512)
    return [b for b in blocks if not b.is_trivial], len(modes)


def test_the_phase_ordered_start_stacks_the_blocks_that_span_forward_and_backward():
    from memoplan.ir import Steps
    from memoplan.solve.levels import level2_starts, phase_ordered

    blocks, layers = _checkpointed_iteration()

    phased = phase_ordered(blocks, Steps(layers).head)
    check_placement(blocks, phased)
    # greedy-by-size puts the 31 GiB backward transients first and leaves holes in the stack
    # of checkpointed layers' inputs; stacked first, those meet the bound
    assert phased.peak == hole_bound(blocks) == 97395 * 2**20 < solve_greedy(blocks).peak
    hidden = [phased.offsets[f"hidden[{i}]"] for i in range(2, layers)]
    assert hidden == sorted(hidden)  # each layer's input lies on the one before it
    began = time.perf_counter()
    starts = level2_starts(blocks, layers, seconds=30)
    assert phased in starts  # at the bound already: no order search for the chained start
    assert time.perf_counter() - began < 10
    placement = solve_mip(blocks, time_limit=5, unit=512, warm_start=phased)
    assert (placement.peak, placement.method, placement.status) == (phased.peak,
                                                                    "phase-ordered", "optimal")


def _llama7b_iteration(seq: int, keep_last: int | None = 1) -> tuple[list[Block], int]:
    """Level 2 of the stored Llama-7B profile on one H200 as solve builds it (the ablation's)."""
    import json

    from memoplan.hardware import get_hardware
    from memoplan.ir import Profile
    from memoplan.solve import SolveConfig
    from memoplan.solve.levels import level1_requests, level2_blocks
    from memoplan.solve.swap import decide_swaps

    profile = Profile.from_json(json.loads((EXAMPLES / "profiles" / "llama7b.json").read_text()))
    cfg = SolveConfig(seq=seq, hardware=get_hardware("h200"), time_limit=2.0,
                      state_bytes_per_param=4.0, keep_last=keep_last)
    peaks = {phase: solve_greedy(blocks_from_requests(level1_requests(profile, cfg, phase))).peak
             for phase in ("forward", "backward")}
    decision = decide_swaps(profile, cfg)
    blocks = level2_blocks(decision.layers, decision.bytes, peaks["forward"], peaks["backward"],
                           cfg.align)
    return [b for b in blocks if not b.is_trivial], len(decision.layers)


def test_chained_split_tensors_interleave_and_the_kept_layer_gets_blocks_of_its_own(
        monkeypatch):
    """Llama-7B at 32K tokens: 31 offloaded layers of 15 split tensors each, and one kept layer.
    Stacked whole, two layers' split tensors take the backward's peak (15.0 GiB); chained, each
    tensor's layers interleave two by two (up, down, up, ...) and the kept layer's tensors can
    lie in the first offloaded layer's holes."""
    from memoplan.solve.levels import chained_splits, chains, place_level, stacked_splits

    blocks, layers = _llama7b_iteration(32 * 1024)
    kept = [b for b in blocks if str(b.id).startswith("kept[31]:")]
    splits = [b for b in blocks if str(b.id).startswith("split[") and b.grow]
    assert len(kept) == 15 and {b.size for b in kept} == {b.top for b in splits}
    # every second layer grows down, from the last offloaded layer (up) on
    assert {int(str(b.id)[6:].split("]")[0]) % 2 for b in splits if b.grows_down} == {1}
    assert all(len(c) == 31 for c in chains(blocks)) and len(chains(blocks)) == 15
    stacked = stacked_splits(blocks)

    chained = chained_splits(blocks, layers, deadline=time.perf_counter() + 3)

    check_placement(blocks, chained)
    assert chained.method == "chained" and chained.peak < 0.95 * stacked.peak, \
        (chained.peak, stacked.peak)
    for c in chains(blocks):  # layer i's copied tokens lie right above layer i+1's tensor
        for upper, lower in zip(c, c[1:]):
            up, down = (upper, lower) if lower.grows_down else (lower, upper)
            assert chained.offsets[down.id] == chained.offsets[up.id] + down.size
    # kept by the solver, the plan says what was chained
    monkeypatch.setattr(mip_dsa, "_searched", lambda problem, start, *, deadline: start)
    placed = place_level(blocks, time_limit=2, unit=512, starts=[stacked, chained])
    assert (placed.peak, placed.method) == (chained.peak, "chained")
    assert placed.note.endswith(f"({chained.note})") and "15 runs" in placed.note


# --- property tests -------------------------------------------------------------------------

SMALL_SIZES = st.sampled_from([1, 2, 3, 4, 6, 8])


@st.composite
def block_lists(draw, max_blocks: int = 25, steps: int = 20, sizes=SMALL_SIZES,
                scale: int = 256) -> list[Block]:
    n = draw(st.integers(0, max_blocks))
    blocks = []
    for i in range(n):
        start = draw(st.integers(0, steps - 1))
        end = draw(st.integers(start + 1, steps))
        blocks.append(block(i, draw(sizes) * scale, start, end))
    return blocks


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_lists())
def test_greedy_and_mip_plans_pass_the_checker(blocks):
    greedy = solve_greedy(blocks)
    best = solve_mip(blocks, time_limit=1)

    check_placement(blocks, greedy)
    check_placement(blocks, best)
    assert best.status in STATUSES
    assert greedy.lower_bound <= best.peak <= greedy.peak
    assert best.status != "optimal" or best.gap == 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_lists(max_blocks=15, sizes=st.integers(1, 20), scale=97))
def test_an_alignment_unit_with_a_greedy_warm_start_in_bytes(blocks):
    # How the bi-level planner calls it: odd sizes, offsets aligned to 512 bytes, and a warm
    # start from greedy-by-size on the raw bytes (off the 512-byte grid).
    result = solve_mip(blocks, time_limit=1, unit=512, warm_start=solve_greedy(blocks))

    check_placement(blocks, result)
    assert all(offset % 512 == 0 for offset in result.offsets.values())
    aligned = [block(b.id, -(-b.size // 512) * 512, b.start, b.end) for b in blocks]
    assert result.peak <= solve_greedy(aligned).peak


@settings(max_examples=30, deadline=None)
@given(block_lists(max_blocks=6, steps=4, sizes=st.sampled_from([1, 2, 3])))
def test_mip_optimum_matches_brute_force(blocks):
    # Few steps make identical and universal blocks common: the reductions must keep an optimum.
    result = solve_mip(blocks, time_limit=10)

    assert result.status == "optimal"
    assert result.peak == brute_force_optimum(blocks)


def traces():
    return request_traces(max_tensors=12, size=st.integers(0, 5000))


@settings(max_examples=50, deadline=None)
@given(traces())
def test_blocks_follow_the_trace_and_the_bound_is_the_live_peak(trace):
    blocks = blocks_from_requests(trace)

    by_id = {b.id: b for b in blocks}
    for step, (op, i, nbytes) in enumerate(trace):
        assert by_id[i].size == nbytes
        assert (by_id[i].start if op == "malloc" else by_id[i].end) == step
    live_per_step = [sum(b.size for b in blocks if b.start <= t < b.end)
                     for t in range(len(trace))]
    assert lower_bound(blocks) == max(live_per_step)


# --- the checker can fail -------------------------------------------------------------------

PAIR = [block("a", 4, 0, 2), block("b", 4, 1, 3)]


def test_checker_accepts_a_valid_plan():
    check_placement(PAIR, plan({"a": 0, "b": 4}, 8, 8))


@pytest.mark.parametrize(("offsets", "peak", "lower", "message"), [
    ({"a": 0, "b": 2}, 6, 8, r"blocks 'a' \(\[0, 4\) bytes, steps \[0, 2\)\) and 'b'"),
    ({"a": 0, "b": 4}, 6, 8, r"block 'b' occupies \[4, 8\) bytes, beyond the claimed peak"),
    ({"a": 0, "b": 4}, 9, 8, "claimed peak is 9 bytes but the blocks reach 8"),
    ({"a": 0, "b": 4}, 8, 7, "claimed lower bound is 7 bytes but .* is 8"),
    ({"a": 0}, 8, 8, r"no offset for blocks \['b'\]"),
    ({"a": 0, "b": 4, "c": 0}, 8, 8, r"offsets given for unknown blocks \['c'\]"),
    ({"a": -4, "b": 4}, 8, 8, "block 'a' has offset -4; need an int >= 0"),
])
def test_checker_rejects_bad_plans(offsets, peak, lower, message):
    with pytest.raises(PlanCheckError, match=message):
        check_placement(PAIR, plan(offsets, peak, lower))


def test_checker_allows_reuse_once_a_block_is_dead():
    # b starts at the step a ends: lifetimes are half-open, so they may share bytes.
    blocks = [block("a", 4, 0, 2), block("b", 4, 2, 3)]
    check_placement(blocks, plan({"a": 0, "b": 0}, 4, 4))


# --- bad traces -----------------------------------------------------------------------------


@pytest.mark.parametrize(("trace", "message"), [
    ([["free", 1, 8]], r"Request 0: free of unknown id 1"),
    ([["malloc", 1, 8], ["malloc", 1, 8]], r"Request 1: malloc of id 1, which is still live"),
    ([["malloc", 1, -8]], r"Request 0: malloc of id 1 has negative bytes \(-8\)"),
    ([["malloc", 1, 8], ["free", 1, 16]], r"free of id 1 says 16 bytes but its malloc said 8"),
    ([["malloc", 1, 8], ["free", 1, 8], ["free", 1, 8]], r"Request 2: free of unknown id 1"),
    ([["alloc", 1, 8]], r"op must be \"malloc\" or \"free\""),
    ([["malloc", 1]], r"expected \[op, id, bytes\]"),
    ([["malloc", 1, 8.5]], r"bytes must be an int"),
])
def test_bad_traces_are_refused_with_the_step(trace, message):
    with pytest.raises(MemoplanError, match=message):
        blocks_from_requests(trace)


def test_live_at_start_and_never_freed_tensors():
    trace = [["malloc", 2, 8], ["free", 1, 16], ["malloc", 3, 4]]

    blocks = blocks_from_requests(trace, live_at_start={1: 16})

    assert blocks == [block(1, 16, 0, 1), block(2, 8, 0, 3), block(3, 4, 2, 3)]
    with pytest.raises(MemoplanError, match="bytes -1; need an int >= 0"):
        blocks_from_requests(trace, live_at_start={1: -1})


def test_an_id_reused_after_its_free_gets_a_numbered_block():
    trace = [["malloc", 7, 8], ["free", 7, 8], ["malloc", 7, 4], ["free", 7, 4]]

    blocks = blocks_from_requests(trace)

    assert [(b.id, b.size, b.start, b.end) for b in blocks] == [(7, 8, 0, 1), ("7#1", 4, 2, 3)]


def test_blocks_refuse_impossible_fields():
    with pytest.raises(MemoplanError, match="size must be >= 0"):
        block("a", -1, 0, 1)
    with pytest.raises(MemoplanError, match="need 0 <= start <= end"):
        block("a", 1, 3, 2)


@st.composite
def growing_block_lists(draw, max_blocks: int = 6, steps: int = 5,
                        down: bool = False) -> list[Block]:
    """Blocks of which some grow (their extra bytes from a step inside their lifetime), with
    `down` some of them down."""
    blocks = []
    for i in range(draw(st.integers(1, max_blocks))):
        start = draw(st.integers(0, steps - 1))
        end = draw(st.integers(start + 1, steps))
        size = draw(st.integers(1, 4))
        if end - start >= 2 and draw(st.booleans()):
            blocks.append(Block(id=i, size=size, start=start, end=end,
                                grow=draw(st.integers(1, 4)),
                                grow_at=draw(st.integers(start + 1, end - 1)),
                                grows_down=down and draw(st.booleans())))
        else:
            blocks.append(block(i, size, start, end))
    return blocks


@settings(max_examples=80, deadline=None)
@given(st.booleans().flatmap(lambda down: growing_block_lists(max_blocks=5 if down else 6,
                                                              down=down)))
def test_with_growing_blocks_the_hole_bound_holds_and_the_solver_finds_the_optimum(blocks):
    """Some blocks grow, up or (in half the examples) some down."""
    down = any(b.grows_down for b in blocks)
    optimum = (compacted_optimum if down else brute_force_optimum)(blocks)

    result = solve_mip(blocks, time_limit=10)

    check_placement(blocks, result)
    assert lower_bound(blocks) <= hole_bound(blocks) <= optimum
    assert (result.peak, result.status) == (optimum, "optimal")
