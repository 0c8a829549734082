"""A simulation of PyTorch's CUDA caching allocator on one request trace: the baseline that shows
how much a solved plan saves over what PyTorch would reserve.

Modelled after ``c10/cuda/CUDACachingAllocator.cpp`` with its default settings, one device and
one stream:

- sizes round up to a multiple of 512 bytes (at least 512); a request of 0 bytes gets no block
  (PyTorch hands out a null pointer) and no entry in ``offsets``;
- two pools: small (rounded size <= 1 MiB) and large; a request is served only from its pool;
- best fit: the smallest free block of the pool that is large enough, the lowest address on ties;
- no fitting block: a new segment ("cudaMalloc") of 2 MiB for the small pool, 20 MiB for large
  sizes under 10 MiB, else the size rounded up to 2 MiB; each new segment gets a fresh address
  range above all earlier ones;
- a block larger than needed is split when the remainder is >= 512 B (small pool) or > 1 MiB
  (large pool); the tensor takes the low part. An unsplit block is handed out whole, and, as in
  PyTorch's ``allocated_bytes``, all of it counts as allocated;
- a free merges the block with free neighbours inside its own segment, never across segments;
- segments are never returned (no ``empty_cache``), so the reserved bytes only grow.

Not modelled: several streams and ``record_stream`` events, ``max_split_size_mb`` (kept at its
default, unlimited), ``roundup_power2_divisions``, ``expandable_segments``, garbage collection
thresholds, out-of-memory retries that release cached segments, CUDA graph private pools, and
allocations made outside the caching allocator (cuBLAS workspaces, NCCL buffers).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from memoplan.solve.dsa import Block, BlockId, blocks_from_requests

MIN_BLOCK = 512  # bytes: every size rounds up to a multiple of this
SMALL_SIZE = 1 << 20  # bytes: the largest "small" request (1 MiB)
SMALL_BUFFER = 2 << 20  # bytes: small-pool segment size (2 MiB)
MIN_LARGE_ALLOC = 10 << 20  # bytes: large requests below this get a LARGE_BUFFER segment
LARGE_BUFFER = 20 << 20  # bytes: 20 MiB
ROUND_LARGE = 2 << 20  # bytes: larger segments round up to a multiple of 2 MiB


@dataclass(frozen=True, kw_only=True)
class CachingResult:
    """What the simulated caching allocator needed for a trace (all sizes in bytes)."""

    allocated_peak: int  # peak of the handed-out block sizes (PyTorch's "allocated")
    reserved_peak: int  # peak of cudaMalloc'ed segment bytes (PyTorch's "reserved")
    segments: list[tuple[int, int]]  # (start address, size) of every segment ever created
    offsets: dict  # id -> address given to each tensor (block ids of blocks_from_requests)
    requested_peak: int  # peak of the raw requested bytes


@dataclass(kw_only=True, eq=False)  # compared by identity: prev/next form cycles
class _Chunk:
    """A piece of one segment: free or handed out (PyTorch's Block)."""

    address: int
    size: int
    small: bool  # which pool it belongs to
    allocated: bool = False
    prev: _Chunk | None = None  # neighbours inside the same segment
    next: _Chunk | None = None


def round_size(nbytes: int) -> int:
    """The size PyTorch allocates for a request: at least 512 B, a multiple of 512 B."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """Bytes of the segment cudaMalloc'ed for a rounded request that no free block fits."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Allocator:
    """The allocator's state: free blocks per pool, segments, and byte counters."""

    def __init__(self) -> None:
        self.free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (size, address)
        self.by_address: dict[int, _Chunk] = {}  # free chunks by address
        self.segments: list[tuple[int, int]] = []
        self.next_address = 0
        self.allocated = self.requested = self.reserved = 0
        self.allocated_peak = self.requested_peak = 0

    def malloc(self, nbytes: int) -> _Chunk:
        """Hand out a block for `nbytes`: best fit from the pool, else a new segment."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        chunk = self._best_fit(size, small) or self._new_segment(size, small)
        remainder = chunk.size - size
        if (remainder >= MIN_BLOCK) if small else (remainder > SMALL_SIZE):
            self._split(chunk, size)
        chunk.allocated = True
        self.allocated += chunk.size
        self.requested += nbytes
        self.allocated_peak = max(self.allocated_peak, self.allocated)
        self.requested_peak = max(self.requested_peak, self.requested)
        return chunk

    def release(self, chunk: _Chunk, nbytes: int) -> None:
        """Return a block to its pool, merged with free neighbours in its segment."""
        chunk.allocated = False
        self.allocated -= chunk.size
        self.requested -= nbytes
        for neighbour in (chunk.prev, chunk.next):
            if neighbour is not None and not neighbour.allocated:
                self._take(neighbour)
                self._merge(chunk, neighbour)
        self._put(chunk)

    def _best_fit(self, size: int, small: bool) -> _Chunk | None:
        """Remove and return the smallest free chunk of the pool that holds `size` bytes."""
        pool = self.free[small]
        index = bisect_left(pool, (size, -1))
        if index == len(pool):
            return None
        return self._take(self.by_address[pool[index][1]])

    def _new_segment(self, size: int, small: bool) -> _Chunk:
        """cudaMalloc a segment above every earlier one; it starts as one chunk."""
        nbytes = segment_size(size)
        chunk = _Chunk(address=self.next_address, size=nbytes, small=small)
        self.segments.append((self.next_address, nbytes))
        self.next_address += nbytes
        self.reserved += nbytes
        return chunk

    def _split(self, chunk: _Chunk, size: int) -> None:
        """Keep the low `size` bytes in `chunk`; the rest becomes a free chunk after it."""
        rest = _Chunk(
            address=chunk.address + size,
            size=chunk.size - size,
            small=chunk.small,
            prev=chunk,
            next=chunk.next,
        )
        if chunk.next is not None:
            chunk.next.prev = rest
        chunk.next = rest
        chunk.size = size
        self._put(rest)

    def _merge(self, chunk: _Chunk, neighbour: _Chunk) -> None:
        """Absorb a free neighbour (just before or just after) into `chunk`."""
        if neighbour is chunk.prev:
            chunk.address = neighbour.address
            chunk.prev = neighbour.prev
            if chunk.prev is not None:
                chunk.prev.next = chunk
        else:
            chunk.next = neighbour.next
            if chunk.next is not None:
                chunk.next.prev = chunk
        chunk.size += neighbour.size

    def _put(self, chunk: _Chunk) -> None:
        """Add a free chunk to its pool."""
        insort(self.free[chunk.small], (chunk.size, chunk.address))
        self.by_address[chunk.address] = chunk

    def _take(self, chunk: _Chunk) -> _Chunk:
        """Remove a free chunk from its pool and return it."""
        pool = self.free[chunk.small]
        del pool[bisect_left(pool, (chunk.size, chunk.address))]
        del self.by_address[chunk.address]
        return chunk


def _events(blocks: Sequence[Block], n_live: int, n_requests: int) -> Iterable[tuple[str, Block]]:
    """The trace replayed from its blocks: tensors live at the start, then one event per request."""
    for block in blocks[:n_live]:
        yield "malloc", block
    born = {block.start: block for block in blocks[n_live:]}
    died = {block.end: block for block in blocks if block.end < n_requests}
    for step in range(n_requests):
        if step in died:
            yield "free", died[step]
        else:
            yield "malloc", born[step]


def simulate_caching_allocator(
    requests: Sequence[Sequence], *, live_at_start: dict | None = None
) -> CachingResult:
    """Replay a request trace through a model of PyTorch's caching allocator (module docstring).

    The trace is validated as by `blocks_from_requests` (same errors). Tensors in
    `live_at_start` are allocated first, in the dict's order.

    >>> result = simulate_caching_allocator([["malloc", 1, 1000], ["malloc", 2, 1000]])
    >>> result.offsets, result.allocated_peak, result.reserved_peak, result.requested_peak
    ({1: 0, 2: 1024}, 2048, 2097152, 2000)
    """
    requests = list(requests)
    blocks = blocks_from_requests(requests, live_at_start=live_at_start)
    allocator = _Allocator()
    chunks: dict[BlockId, _Chunk] = {}
    offsets: dict[BlockId, int] = {}
    for op, block in _events(blocks, len(live_at_start or {}), len(requests)):
        if block.size == 0:
            continue
        if op == "malloc":
            chunks[block.id] = allocator.malloc(block.size)
            offsets[block.id] = chunks[block.id].address
        else:
            allocator.release(chunks.pop(block.id), block.size)
    return CachingResult(
        allocated_peak=allocator.allocated_peak,
        reserved_peak=allocator.reserved,
        segments=list(allocator.segments),
        offsets=offsets,
        requested_peak=allocator.requested_peak,
    )
