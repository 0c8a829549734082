"""The copy/compute schedule of one iteration under a plan, as the runtime would run it.

Three streams: compute, device-to-host (d2h) and host-to-device (h2d). Forward: layer i's
saved tensors are copied out while layer i+1 computes; layer i+2 reuses layer i's rounding
buffer, so it waits for that copy. Backward (layers in reverse): layer i's data is prefetched
while layer i+1's backward runs; layer i starts when the prefetch is done, recomputes its
dropped tokens, then runs its backward. Checkpointed layers re-run their whole forward first.
Waits on the compute stream are ``stall`` bars. The cost model's iteration time is the end of
the last bar; ``memoplan plot`` draws the bars.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memoplan.ir import LayerDecision


@dataclass(frozen=True, kw_only=True)
class Bar:
    stream: str    # "compute" | "d2h" | "h2d"
    kind: str      # "forward" | "backward" | "recompute" | "copy" | "stall"
    layer: int
    start: float   # seconds
    end: float


def schedule(layers: Sequence[LayerDecision], *, forward_s: float, backward_s: float,
             token_wise_forward_s: float, pcie_bytes_per_s: float) -> list[Bar]:
    """Bars of one iteration (see the module docstring)."""
    bars: list[Bar] = []
    n = len(layers)
    t = 0.0
    d2h_free = 0.0
    copy_done: dict[int, float] = {}
    for d in layers:
        i = d.index
        ready = copy_done.get(i - 2, 0.0)  # rounding buffer i % 2 is free again
        if ready > t:
            bars.append(Bar(stream="compute", kind="stall", layer=i, start=t, end=ready))
            t = ready
        bars.append(Bar(stream="compute", kind="forward", layer=i, start=t, end=t + forward_s))
        t += forward_s
        if d.mode == "offload" and d.swapped_bytes:
            start = max(t, d2h_free)
            d2h_free = start + d.swapped_bytes / pcie_bytes_per_s
            copy_done[i] = d2h_free
            bars.append(Bar(stream="d2h", kind="copy", layer=i, start=start, end=d2h_free))
    h2d_free = t
    prefetch_done: dict[int, float] = {}

    def prefetch(i: int, not_before: float) -> None:
        nonlocal h2d_free
        if 0 <= i < n and layers[i].mode == "offload" and layers[i].swapped_bytes:
            start = max(not_before, h2d_free, copy_done.get(i, 0.0))
            h2d_free = start + layers[i].swapped_bytes / pcie_bytes_per_s
            prefetch_done[i] = h2d_free
            bars.append(Bar(stream="h2d", kind="copy", layer=i, start=start, end=h2d_free))

    prefetch(n - 1, t)
    for d in reversed(layers):
        i = d.index
        prefetch(i - 1, t)  # layer i-1's data comes in while layer i runs backward
        ready = prefetch_done.get(i, t)
        if ready > t:
            bars.append(Bar(stream="compute", kind="stall", layer=i, start=t, end=ready))
            t = ready
        redo = (forward_s if d.mode == "recompute"
                else (1.0 - d.alpha) * token_wise_forward_s if d.mode == "offload" else 0.0)
        if redo > 0:
            bars.append(Bar(stream="compute", kind="recompute", layer=i, start=t, end=t + redo))
            t += redo
        bars.append(Bar(stream="compute", kind="backward", layer=i, start=t, end=t + backward_s))
        t += backward_s
    return bars


def iteration_seconds(bars: Sequence[Bar]) -> float:
    return max((b.end for b in bars), default=0.0)
