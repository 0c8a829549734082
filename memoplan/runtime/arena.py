"""The plan's arena: one preallocated buffer; the runtime's own buffers are views into it.

The level-2 plan gives every per-layer block of the iteration an offset in one arena of
``plan.arena_bytes``. The runtime allocates, per layer, the buffers that layer ``i``'s saved
tensors come back into before its backward (the ``prefetch[i]`` block: copies from the host,
and the full token range of each split tensor, whose dropped tokens are recomputed into it).
Those are views into the arena at the block's offset, laid out one after the other, so every
step places them at the same addresses and nothing fragments.

A block is leased for the time the plan gives it (from the prefetch during layer ``i+1``'s
backward to the end of layer ``i``'s backward) and its views are handed out from the lease.
A split tensor whose tokens are outermost in memory has a growing block of its own
(``split[i]:NAME``): leased with its copied tokens' bytes during layer ``i+1``'s backward, and
extended by the bytes of its recomputed tokens when layer ``i``'s backward starts: right after
them, or right before them where its copied tokens are its last ones (the plan gives the block
a negative growth: it grows down); the tensor is one view over the whole block.
Safety does not rest on the plan being right: a lease whose address range overlaps a live
lease (or, with the planned allocator, a live planned tensor) is refused, and a view that does
not fit its block (a longer sequence than planned) is an ordinary allocation; both are counted
(``Arena.misses``) and the run stays correct.
"""

from __future__ import annotations

import torch

from memoplan.trace.recompute import dim_order

ALIGN = 512  # bytes; offsets inside a block are rounded up to this


def empty_laid_out(shape: tuple[int, ...], dtype: torch.dtype, order: list[int],
                   **kw) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` whose dims lie in memory in ``order``."""
    flat = torch.empty([shape[d] for d in order], dtype=dtype, **kw)
    return flat.permute([order.index(d) for d in range(len(shape))])


class Lease:
    """One block of the arena, held by one layer call; hands out consecutive views."""

    def __init__(self, arena: Arena, name: str, start: int, size: int, grow: int = 0) -> None:
        self.arena, self.name, self.start, self.size = arena, name, start, size
        # bytes it may claim later (extend()): right after the block, or right before it when
        # negative (it grows down)
        self.grow = grow
        self.used = 0

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype, order: list[int],
               last: int = 0) -> torch.Tensor | None:
        """One tensor over the block, to fill as the block grows (only ``size`` bytes are
        claimed until ``extend()``): from its start, or, where it grows down, with its ``last``
        bytes (what fills them first) at the end of the claimed ones, and its start 16-byte
        aligned where that keeps them there; None where it does not fit."""
        laid = [shape[d] for d in order]
        nbytes = torch.Size(laid).numel() * dtype.itemsize
        room = self.size + abs(self.grow)
        if not room or nbytes > room:
            return None
        self.used = self.size if self.grow < 0 else max(self.used, min(nbytes, self.size))
        self.arena.hits += 1
        at = 0
        if self.grow < 0:  # (a misaligned start only slows kernels: only where it must)
            at = self.size - nbytes
            at -= (self.start + at) % 16 if (self.start + at) % 16 <= self.size - last else 0
        first = ALIGN + self.start + at
        raw = self.arena.buffer[first: first + nbytes]
        return raw.view(dtype).view(laid).permute([order.index(d) for d in range(len(shape))])

    def extend(self) -> bool:
        """Claim the block's later bytes (``grow``); False, claiming nothing, where they are
        still in use (a live lease, or with the planned allocator a live planned tensor)."""
        if not self.grow:
            return True
        start = self.start + min(self.grow, 0)
        size = self.size + abs(self.grow)
        if any(l is not self and start < l.start + l.size and l.start < start + size
               for l in self.arena.leases.values()):
            return False
        planner = self.arena.planner
        if planner is not None:
            planner.unreserve(self.start)
            if not planner.reserve(start, size):
                planner.reserve(self.start, self.size)
                return False
        self.start, self.size, self.grow = start, size, 0
        self.used = self.size  # (poisoned whole on release)
        return True

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype,
              order: list[int] | None = None) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` in the block, its dims laid out in memory in
        ``order`` (outermost first; default: row-major). Falls back to an ordinary allocation
        when the block is full."""
        order = list(order) if order is not None else list(range(len(shape)))
        laid = [shape[d] for d in order]
        nbytes = torch.Size(laid).numel() * dtype.itemsize
        at = -(-self.used // ALIGN) * ALIGN
        if at + nbytes > self.size:
            self.arena.misses += 1
            return empty_laid_out(shape, dtype, order, device=self.arena.device)
        self.used = at + nbytes
        self.arena.hits += 1
        first = ALIGN + self.start + at  # the buffer's first ALIGN bytes are never handed out
        raw = self.arena.buffer[first: first + nbytes]
        return raw.view(dtype).view(laid).permute([order.index(d) for d in range(len(shape))])

    def release(self, *, poison: bool = False) -> None:
        """Give the block back (``poison``: fill it with NaN bytes first, so that a tensor still
        read after its release shows as NaN gradients)."""
        if poison and self.used:
            self.arena.buffer[ALIGN + self.start: ALIGN + self.start + self.used].fill_(0xFF)
        if self.arena.leases.get(self.name) is self:
            del self.arena.leases[self.name]
            if self.arena.planner is not None:
                self.arena.planner.unreserve(self.start)


class Arena:
    """The arena of one model's plan on one device (allocated at the first lease)."""

    def __init__(self, blocks: dict[str, tuple[int, int]], nbytes: int,
                 device: torch.device, grows: dict[str, int] | None = None) -> None:
        self.blocks = blocks      # block name -> (offset, size)
        # growing block name -> the bytes it claims later (negative: right before it)
        self.grows = grows or {}
        self.nbytes = nbytes
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.leases: dict[str, Lease] = {}
        self.hits = 0             # views placed in the arena
        self.misses = 0           # allocations that fell back (block full, busy or unplanned)
        self.planner = None       # the planned allocator (allocator.py), when installed

    @classmethod
    def for_plan(cls, plan, device: torch.device) -> Arena:
        blocks = plan.layer.arena  # the runtime's own buffers: prefetch[i], split[i]:NAME
        return cls({name: (at, size) for name, (at, size, _) in blocks.items()}, plan.arena_bytes,
                   device, {name: grow for name, (_, _, grow) in blocks.items() if grow})

    def start(self) -> None:
        """Allocate the arena (once) and hand it to the planned allocator, if any."""
        if self.buffer is None:
            if self.planner is not None:
                self.planner.let_go_idle_arena()  # a gone model's arena, before this one's
            # offset 0 of the plan is ALIGN bytes in: a planned tensor never gets the address of
            # the buffer itself (which PyTorch's allocator bookkeeping already holds)
            self.buffer = torch.empty(ALIGN + self.nbytes, dtype=torch.uint8, device=self.device)
            if self.planner is not None and not self.planner.set_arena(  # transients go there too
                    self.buffer.data_ptr() + ALIGN, self.nbytes, keep=self.buffer):
                self.planner = None  # another model's arena is in use: its plan goes on alone

    def lease(self, name: str) -> Lease:
        """Lease block ``name``; an unplanned block, or one whose addresses overlap a live lease
        (two forwards of a layer before its backward), gives an empty lease (every view falls
        back)."""
        self.start()
        start, size = self.blocks.get(name, (0, 0))
        grow = self.grows.get(name, 0)
        if name in self.leases or any(start < l.start + l.size and l.start < start + size
                                      for l in self.leases.values()):
            start, size, grow = 0, 0, 0
        if size and self.planner is not None and not self.planner.reserve(start, size):
            start, size, grow = 0, 0, 0  # a planned tensor still lives there
        lease = Lease(self, name, start, size, grow)
        if size:
            self.leases[name] = lease
        return lease

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in the arena."""
        return self.buffer is not None and \
            t.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr()
