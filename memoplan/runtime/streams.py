"""Moving kept tensors between the device and the host.

``Copier`` on a CPU clones (the "host" is the same memory space), so CI exercises the same
schedule. On a CUDA device it copies on two side streams: device-to-host after each layer's
forward (the compute stream goes on with the next layer) and host-to-device in backward, where
a layer's data is prefetched into its arena block while the next layer (in backward order)
computes. Host buffers (pinned on a GPU) are kept per (layer, tensor, shape) and reused every
step once their backward has brought them back: pinning is slow (1.9 s for 4 GiB on an H200
host), so it never happens per step once the first iteration has run, and a second forward of
a layer before its backward gets buffers of its own.

Stream safety does not rely on ``record_stream`` (a process-wide pluggable allocator, see
``allocator.py``, ignores it): the device tensors a layer copies out are held, with an event
recorded after their copies, until the compute stream has waited for that event (before layer
i+2's forward, the paper's rounding-buffer rule, or before any backward); a prefetch into the
arena first waits for the compute work queued before it, the previous users of those addresses.

The CUDA path has not run on a GPU yet (no device in the sessions that wrote it): treat it as
untested until the GPU checks in benchmarks/ have been run.
"""

from __future__ import annotations

from typing import Any

import torch

from memoplan.runtime.arena import empty_laid_out


class Copier:
    """Device <-> host copies for one model; one instance serves all its layers."""

    def __init__(self) -> None:
        # host buffers by (layer/tensor key, shape, dtype, layout): free ones wait for reuse;
        # one held by a layer call that has not run its backward yet is never written again
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._d2h: torch.cuda.Stream | None = None
        self._h2d: torch.cuda.Stream | None = None
        self.host_buffer_bytes = 0                           # all host buffers made (pinned on a GPU)
        self._copying: list[torch.Tensor] = []               # sources of this forward's copies
        self._held: dict[int, tuple[Any, list[torch.Tensor]]] = {}  # layer -> (event, sources)

    def _streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if self._d2h is None:
            self._d2h = torch.cuda.Stream(device)
            self._h2d = torch.cuda.Stream(device)
        return self._d2h, self._h2d

    def to_host(self, key: str, t: torch.Tensor, order: list[int]) -> tuple[tuple, torch.Tensor]:
        """Copy ``t`` into a host buffer laid out in ``order``; returns (the buffer's slot, the
        buffer). Hand the slot back with ``give_back`` once the copy has been brought back."""
        slot = (key, tuple(t.shape), t.dtype, tuple(order))
        free = self._free.get(slot)
        cuda = t.device.type == "cuda"
        if free:
            buf = free.pop()
        else:  # pinning is slow: it happens only until every slot has its buffers
            buf = empty_laid_out(t.shape, t.dtype, order, pin_memory=cuda)
            self.host_buffer_bytes += buf.numel() * buf.element_size()
        if not cuda:
            buf.copy_(t)
            return slot, buf
        d2h, _ = self._streams(t.device)
        d2h.wait_stream(torch.cuda.current_stream(t.device))  # t is written; buf's last read done
        with torch.cuda.stream(d2h):
            buf.copy_(t, non_blocking=True)
        t.record_stream(d2h)  # enough for the caching allocator; the hold below for any other
        self._copying.append(t)
        return slot, buf

    def give_back(self, slot: tuple, buf: torch.Tensor) -> None:
        """``buf`` was copied back (the compute stream waited for that): reusable."""
        self._free.setdefault(slot, []).append(buf)

    def finish_forward(self, index: int) -> None:
        """Layer ``index``'s copies are queued: hold their sources until they are done."""
        if not self._copying:
            return
        if index in self._held:  # an earlier call of this layer that no backward has seen
            self.release_copied(only=index)
        done = torch.cuda.Event()
        done.record(self._d2h)
        self._held[index] = (done, self._copying)
        self._copying = []

    def wait_copies(self, index: int) -> None:
        """The compute stream waits until layer ``index``'s copies are done (its sources stay
        held)."""
        if index in self._held:
            done, sources = self._held[index]
            torch.cuda.current_stream(sources[0].device).wait_event(done)

    def release_copied(self, before: int | None = None, only: int | None = None) -> None:
        """Let the compute stream wait for the copies of layers ``< before`` (all if None; only
        layer ``only`` if given) and drop their sources, whose memory it may then reuse."""
        for index in list(self._held):
            if (only is not None and index != only) or (before is not None and index >= before):
                continue
            self.wait_copies(index)
            del self._held[index]

    def prefetch(self, host: torch.Tensor, dest: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying a host copy into ``dest`` on the host-to-device stream; returns ``dest``
        and an event that ``ready`` waits for (the compute stream goes on meanwhile)."""
        if dest.device.type != "cuda":
            dest.copy_(host)
            return dest, None
        d2h, h2d = self._streams(dest.device)
        h2d.wait_stream(d2h)  # the forward copy into this host buffer has finished
        h2d.wait_stream(torch.cuda.current_stream(dest.device))  # earlier users of dest's memory
        with torch.cuda.stream(h2d):
            dest.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(h2d)
        return dest, done

    def ready(self, fetched: tuple[torch.Tensor, Any]) -> torch.Tensor:
        """The prefetched tensor, once the compute stream has waited for its copy."""
        out, done = fetched
        if done is not None:
            torch.cuda.current_stream(out.device).wait_event(done)
        return out
