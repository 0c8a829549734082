"""The caching-allocator simulation: hand-made cases with the numbers PyTorch's allocator gives
(rounding, pools, segment sizes, splitting, merging), and invariants on random traces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memoplan.errors import MemoplanError
from strategies import request_traces
from memoplan.solve.caching_sim import round_size, segment_size, simulate_caching_allocator
from memoplan.solve.check import check_placement
from memoplan.solve.dsa import Block, Placement, blocks_from_requests, lower_bound

KiB, MiB = 1 << 10, 1 << 20


def test_sizes_round_up_to_512_bytes():
    result = simulate_caching_allocator([["malloc", 1, 1], ["malloc", 2, 513], ["malloc", 3, 512]])

    assert result.requested_peak == 1 + 513 + 512
    assert result.allocated_peak == 512 + 1024 + 512
    assert result.offsets == {1: 0, 2: 512, 3: 1536}
    assert [round_size(n) for n in (0, 1, 512, 513, 1 * MiB)] == [512, 512, 512, 1024, 1 * MiB]


def test_segment_sizes_follow_the_pools():
    assert segment_size(512) == 2 * MiB  # small pool
    assert segment_size(1 * MiB) == 2 * MiB
    assert segment_size(1 * MiB + 512) == 20 * MiB  # large pool, under 10 MiB
    assert segment_size(10 * MiB) == 10 * MiB
    assert segment_size(11 * MiB) == 12 * MiB  # rounded up to 2 MiB


def test_two_small_tensors_share_one_2_mib_segment():
    result = simulate_caching_allocator([["malloc", "a", 100 * KiB], ["malloc", "b", 200 * KiB]])

    assert result.segments == [(0, 2 * MiB)]
    assert result.offsets == {"a": 0, "b": 100 * KiB}
    assert result.reserved_peak == 2 * MiB
    assert result.allocated_peak == 300 * KiB


def test_small_and_large_requests_never_share_a_segment():
    trace = [["malloc", "small", 4 * KiB], ["malloc", "large", 2 * MiB]]

    result = simulate_caching_allocator(trace)

    assert result.segments == [(0, 2 * MiB), (2 * MiB, 20 * MiB)]
    assert result.offsets == {"small": 0, "large": 2 * MiB}


def test_a_free_then_a_larger_malloc_needs_a_new_segment():
    # The cached 12 MiB block is too small for 14 MiB: cudaMalloc again, and keep both.
    trace = [["malloc", "a", 12 * MiB], ["free", "a", 12 * MiB], ["malloc", "b", 14 * MiB]]

    result = simulate_caching_allocator(trace)

    assert result.segments == [(0, 12 * MiB), (12 * MiB, 14 * MiB)]
    assert result.offsets == {"a": 0, "b": 12 * MiB}
    assert result.allocated_peak == 14 * MiB
    assert result.reserved_peak == 26 * MiB > result.allocated_peak


def test_a_cached_block_is_reused_best_fit():
    # Free blocks of 12 and 16 MiB are cached; 11 MiB goes to the smaller one, unsplit (the
    # 1 MiB remainder is not above 1 MiB), so all 12 MiB count as allocated.
    trace = [["malloc", "a", 12 * MiB], ["malloc", "b", 16 * MiB], ["free", "b", 16 * MiB],
             ["free", "a", 12 * MiB], ["malloc", "c", 11 * MiB]]

    result = simulate_caching_allocator(trace)

    assert result.offsets["c"] == result.offsets["a"] == 0
    assert len(result.segments) == 2
    assert result.allocated_peak == 28 * MiB
    assert result.requested_peak == 28 * MiB


def test_large_blocks_split_only_above_1_mib():
    # 19 MiB gets a 20 MiB segment (rounded to 2 MiB) whose 1 MiB rest is not split off:
    # PyTorch counts the whole block as allocated.
    unsplit = simulate_caching_allocator([["malloc", "a", 19 * MiB]])
    assert (unsplit.allocated_peak, unsplit.requested_peak) == (20 * MiB, 19 * MiB)

    # 5 MiB takes a 20 MiB segment and splits: the next 5 MiB request lands right after it.
    split = simulate_caching_allocator([["malloc", "a", 5 * MiB], ["malloc", "b", 5 * MiB]])
    assert split.segments == [(0, 20 * MiB)]
    assert split.offsets == {"a": 0, "b": 5 * MiB}
    assert split.allocated_peak == 10 * MiB


def test_freed_neighbours_merge_inside_a_segment():
    # a, b, c fill the first 1.5 MiB of one small segment. Freeing a and b leaves one 1 MiB
    # free block at 0 only if they merge; d (1 MiB) then fits there without a new segment.
    half = 512 * KiB
    trace = [["malloc", "a", half], ["malloc", "b", half], ["malloc", "c", half],
             ["free", "a", half], ["free", "b", half], ["malloc", "d", 1 * MiB]]

    result = simulate_caching_allocator(trace)

    assert result.offsets["d"] == 0
    assert result.segments == [(0, 2 * MiB)]


def test_free_blocks_never_merge_across_segments():
    # Two 12 MiB segments sit back to back in the address space; once both are free, 20 MiB
    # would fit across them, but blocks only merge within a segment: a third segment it is.
    trace = [["malloc", "a", 12 * MiB], ["malloc", "b", 12 * MiB], ["free", "a", 12 * MiB],
             ["free", "b", 12 * MiB], ["malloc", "c", 20 * MiB]]

    result = simulate_caching_allocator(trace)

    assert result.segments == [(0, 12 * MiB), (12 * MiB, 12 * MiB), (24 * MiB, 20 * MiB)]
    assert result.offsets["c"] == 24 * MiB
    assert result.reserved_peak == 44 * MiB


def test_live_at_start_zero_bytes_and_bad_traces():
    result = simulate_caching_allocator(
        [["malloc", "empty", 0], ["free", "w", 4 * KiB], ["malloc", "x", 4 * KiB]],
        live_at_start={"w": 4 * KiB},
    )

    assert result.offsets == {"w": 0, "x": 0}  # x reuses w's freed block; 0 bytes get none
    assert result.reserved_peak == 2 * MiB
    with pytest.raises(MemoplanError, match="free of unknown id 'v'"):
        simulate_caching_allocator([["free", "v", 8]])


def traces():
    """Traces mixing small and large sizes (small and large pools both used)."""
    size = st.one_of(st.integers(0, 2 * MiB), st.integers(1 * MiB, 40 * MiB))
    return request_traces(max_tensors=30, size=size)


@settings(max_examples=60, deadline=None)
@given(traces())
def test_reserved_covers_allocated_covers_requested(trace):
    result = simulate_caching_allocator(trace)

    blocks = blocks_from_requests(trace)
    assert result.reserved_peak >= result.allocated_peak >= result.requested_peak
    assert result.requested_peak == lower_bound(blocks)
    assert result.reserved_peak == sum(size for _, size in result.segments)


@settings(max_examples=60, deadline=None)
@given(traces())
def test_live_tensors_never_share_bytes_and_stay_inside_segments(trace):
    result = simulate_caching_allocator(trace)

    # Each tensor as a block of its rounded size at the simulated address: a valid placement.
    blocks = [Block(id=b.id, size=round_size(b.size), start=b.start, end=b.end)
              for b in blocks_from_requests(trace) if b.size > 0]
    peak = max((result.offsets[b.id] + b.size for b in blocks), default=0)
    check_placement(blocks, Placement(offsets=result.offsets, peak=peak,
                                      lower_bound=lower_bound(blocks), method="caching",
                                      status="feasible", gap=0.0, seconds=0.0))
    for b in blocks:
        address = result.offsets[b.id]
        assert any(start <= address and address + b.size <= start + size
                   for start, size in result.segments)
