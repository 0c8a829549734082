"""Moving kept tensors between the device and the host.

``Copier`` on a CPU clones (the "host" is the same memory space), so CI exercises the same
schedule. On a CUDA device it copies on two side streams: device-to-host after each layer's
forward (the compute stream goes on with the next layer) and host-to-device in backward, where
a layer's data is prefetched into its arena block while the next layer (in backward order)
computes. Host buffers are pinned once per (layer, tensor) key and reused every step: pinning is
slow (1.9 s for 4 GiB on an H200 host), so it never happens per step once the first iteration
has run.

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

from memoplan.runtime.arena import dim_order, empty_laid_out


class Copier:
    """Device <-> host copies for one model; one instance serves all its layers."""

    def __init__(self) -> None:
        self.pinned: dict[str, torch.Tensor] = {}
        self._d2h: torch.cuda.Stream | None = None
        self._h2d: torch.cuda.Stream | None = None
        self.pinned_bytes = 0
        self._copying: list[torch.Tensor] = []               # sources of this forward's copies
        self._held: dict[int, tuple[Any, list[torch.Tensor]]] = {}  # layer -> (event, sources)

    def _streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if self._d2h is None:
            self._d2h = torch.cuda.Stream(device)
            self._h2d = torch.cuda.Stream(device)
        return self._d2h, self._h2d

    def to_host(self, key: str, t: torch.Tensor, order: list[int]) -> torch.Tensor:
        """A host copy of ``t`` with its dims laid out in ``order`` (a clone on a CPU); ``key``
        names its reusable pinned buffer."""
        if t.device.type != "cuda":
            out = empty_laid_out(t.shape, t.dtype, order)
            return out.copy_(t)
        d2h, _ = self._streams(t.device)
        buf = self.pinned.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or dim_order(buf) != order:
            buf = empty_laid_out(t.shape, t.dtype, order, pin_memory=True)
            self.pinned[key] = buf
            self.pinned_bytes = sum(b.numel() * b.element_size() for b in self.pinned.values())
        d2h.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(d2h):
            buf.copy_(t, non_blocking=True)
        t.record_stream(d2h)  # enough for the caching allocator; the hold below for any other
        self._copying.append(t)
        return buf

    def finish_forward(self, index: int) -> None:
        """Layer ``index``'s copies are queued: hold their sources until they are done."""
        if not self._copying:
            return
        done = torch.cuda.Event()
        done.record(self._d2h)
        self._held[index] = (done, self._copying)
        self._copying = []

    def release_copied(self, before: int | None = None) -> None:
        """Let the compute stream wait for the copies of layers ``< before`` (all if None) and
        drop their sources, whose memory it may then reuse."""
        for index in [i for i in self._held if before is None or i < before]:
            done, sources = self._held.pop(index)
            torch.cuda.current_stream(sources[0].device).wait_event(done)

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
