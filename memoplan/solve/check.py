"""The independent checker every solved plan is replayed through (OLLA's address validation).

It shares no code with the solvers: it recomputes the lower bound with its own sweep and tests
every pair of blocks live at a common step for overlapping addresses, with the bytes each holds
at each step worked out on its own (`_held`). Lifetimes and address
ranges are half-open, ``[start, end)`` and ``[offset, offset + size)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from memoplan.errors import MemoplanError
from memoplan.solve.dsa import Block, Placement


class PlanCheckError(MemoplanError):
    """A plan breaks one of the rules of a valid placement; the message names the blocks."""


def check_placement(blocks: Sequence[Block], placement: Placement) -> None:
    """Raise PlanCheckError unless `placement` is a valid plan for `blocks` as claimed.

    Checks: one offset per block and none for unknown ids; offsets are ints >= 0; every block
    ends at or below ``placement.peak``; the peak is exactly max(offset + size); no two blocks
    live at a common step share a byte; ``placement.lower_bound`` is the largest total of
    simultaneously live bytes.

    >>> from memoplan.solve.dsa import Block, Placement
    >>> blocks = [Block(id="a", size=4, start=0, end=2), Block(id="b", size=4, start=1, end=3)]
    >>> bad = Placement(offsets={"a": 0, "b": 2}, peak=6, lower_bound=8, method="hand",
    ...                 status="feasible", gap=0.0, seconds=0.0)
    >>> check_placement(blocks, bad)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    memoplan.solve.check.PlanCheckError: blocks 'a' ([0, 4) bytes, ...) and 'b' ([2, 6) ...
    """
    _check_ids(blocks, placement)
    _check_offsets(blocks, placement)
    _check_peak(blocks, placement)
    _check_disjoint(blocks, placement)
    _check_lower_bound(blocks, placement)


def _check_ids(blocks: Sequence[Block], placement: Placement) -> None:
    """Every block has an offset; no offset belongs to an unknown id; ids are unique."""
    counts = Counter(b.id for b in blocks)
    duplicates = [block_id for block_id, n in counts.items() if n > 1]
    if duplicates:
        raise PlanCheckError(f"block ids appear more than once: {duplicates!r}")
    missing = [block_id for block_id in counts if block_id not in placement.offsets]
    if missing:
        raise PlanCheckError(f"no offset for blocks {missing!r}")
    extra = [block_id for block_id in placement.offsets if block_id not in counts]
    if extra:
        raise PlanCheckError(f"offsets given for unknown blocks {extra!r}")


def _check_offsets(blocks: Sequence[Block], placement: Placement) -> None:
    """Offsets are ints >= 0 and every block lies below the claimed peak."""
    for block in blocks:
        offset = placement.offsets[block.id]
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise PlanCheckError(f"block {block.id!r} has offset {offset!r}; need an int >= 0")
        if offset + block.top > placement.peak:
            raise PlanCheckError(
                f"block {block.id!r} occupies [{offset}, {offset + block.top}) bytes, "
                f"beyond the claimed peak of {placement.peak} bytes"
            )


def _check_peak(blocks: Sequence[Block], placement: Placement) -> None:
    """The claimed peak is exactly the highest byte any block reaches."""
    actual = 0
    for block in blocks:
        actual = max(actual, placement.offsets[block.id] + block.top)
    if placement.peak != actual:
        raise PlanCheckError(
            f"claimed peak is {placement.peak} bytes but the blocks reach {actual} bytes"
        )


def _check_disjoint(blocks: Sequence[Block], placement: Placement) -> None:
    """No two blocks live at a common step overlap in address (sweep over starts)."""
    order = sorted(blocks, key=lambda b: (b.start, b.end))
    live: list[Block] = []
    for block in order:
        if block.top == 0 or block.start == block.end:
            continue
        live = [other for other in live if other.end > block.start]
        for other in live:
            _check_pair(other, block, placement.offsets)
        live.append(block)


def _check_pair(a: Block, b: Block, offsets: dict) -> None:
    """Raise when blocks a and b (live at a common step) share an address at a step both live:
    the first such step, or one where either grows (what each holds changes only there)."""
    first, last = max(a.start, b.start), min(a.end, b.end)
    grows = {x.grow_at for x in (a, b) if x.grow and first < x.grow_at < last}
    for step in sorted({first} | grows):
        (low_a, high_a), (low_b, high_b) = (_held(x, offsets[x.id], step) for x in (a, b))
        if low_a < high_b and low_b < high_a:
            raise PlanCheckError(
                f"blocks {a.id!r} ([{low_a}, {high_a}) bytes, steps [{a.start}, {a.end})) "
                f"and {b.id!r} ([{low_b}, {high_b}) bytes, steps [{b.start}, {b.end})) "
                f"are live together at overlapping addresses (step {step})"
            )


def _held(block: Block, offset: int, step: int) -> tuple[int, int]:
    """The address range a block holds at a step it lives: all of it once it has grown, else
    its first ``size`` bytes, or its last where it grows down."""
    top = offset + block.size + block.grow
    if not block.grow or step >= block.grow_at:
        return offset, top
    return (top - block.size, top) if block.grows_down else (offset, offset + block.size)


def _live_bytes_peak(blocks: Sequence[Block]) -> int:
    """Largest total of live bytes at any step, from a per-step difference table."""
    change: dict[int, int] = {}
    for block in blocks:
        if block.start < block.end:
            change[block.start] = change.get(block.start, 0) + block.size
            change[block.end] = change.get(block.end, 0) - block.top
            if block.grow:
                change[block.grow_at] = change.get(block.grow_at, 0) + block.grow
    live = peak = 0
    for step in sorted(change):
        live += change[step]
        peak = max(peak, live)
    return peak


def _check_lower_bound(blocks: Sequence[Block], placement: Placement) -> None:
    """The claimed lower bound is the recomputed peak of live bytes."""
    expected = _live_bytes_peak(blocks)
    if placement.lower_bound != expected:
        raise PlanCheckError(
            f"claimed lower bound is {placement.lower_bound} bytes but the largest total of "
            f"simultaneously live bytes is {expected}"
        )
