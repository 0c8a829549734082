"""Pictures of a plan (``memoplan plot``), of a sweep, and of a real PyTorch memory snapshot.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state,
no display; the Agg canvas renders it); :func:`write_pngs` saves them. Addresses are drawn in
MiB, one rectangle per tensor or block: x is its lifetime (request steps for level 1, phase steps
for level 2), y its address range, as in PyTorch's memory snapshot viewer. Artists carry a
``gid`` (``block:<id>``, ``peak``, ``lower_bound``, ``live``, ``reserved_peak``, ``segment``,
``arena``, ``bar:<stream>:<kind>:<layer>``) so tests and scripts can find them.

Snapshots are read with an unpickler that refuses every class: a real
``torch.cuda.memory._snapshot()`` pickle holds only dicts, lists, strings and numbers, so a
foreign pickle is rejected before any of its code could run.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter

from memoplan.errors import MemoplanError
from memoplan.ir import LevelPlan, Plan, Steps
from memoplan.solve.caching_sim import CachingResult, simulate_caching_allocator
from memoplan.solve.dsa import Block
from memoplan.solve.levels import blocks_to_requests
from memoplan.timeline import Bar, iteration_seconds, schedule
from memoplan.units import fmt_tokens

MIB = 2**20
GIB = 2**30
DPI = 110

KIND_COLORS = {
    "transient": "#9aa9bd", "output": "#59a14f", "grad": "#f28e2b", "input": "#b07aa1",
    "rounding": "#4e79a7", "prefetch": "#76b7b2", "recompute": "#e15759", "head": "#9c755f",
    "split": "#edc948",
}
OTHER_COLOR = "#bab0ac"
BAR_COLORS = {"forward": "#4e79a7", "backward": "#f28e2b", "recompute": "#b07aa1",
              "copy": "#59a14f", "stall": "#d62728"}
STALL_EDGE = "#7a0c0c"  # edge and hatch of stall bars
STREAMS = ("compute", "d2h", "h2d")  # top to bottom
STREAM_LABELS = {"compute": "compute", "d2h": "D2H (offload)", "h2d": "H2D (prefetch)"}
STRATEGY_STYLE = {"plan": ("plan", "#4e79a7", "o-"), "keep_all": ("keep all", "#59a14f", "s--"),
                  "full_recompute": ("full recompute", "#e15759", "^:")}


# ---- shared pieces ---------------------------------------------------------------------------

def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas with constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _mib_axis(ax: Axes, top_bytes: float) -> None:
    """y from 0 to a little above ``top_bytes``, labelled in MiB with thousands separators."""
    ax.set_ylim(0, max(top_bytes, 1) * 1.1 / MIB)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_ylabel("address (MiB)")


def _hline(ax: Axes, y_bytes: float, *, label: str, color: str, style: str, gid: str,
           left: bool = False) -> Line2D:
    """A horizontal line across the axes at ``y_bytes``, labelled at its right (or left) end."""
    line = ax.axhline(y_bytes / MIB, color=color, linestyle=style, linewidth=1.3, label=label,
                      gid=gid, zorder=4)
    ax.annotate(label, xy=(0.0 if left else 1.0, y_bytes / MIB),
                xycoords=("axes fraction", "data"), xytext=(4 if left else -4, 2),
                textcoords="offset points", ha="left" if left else "right", va="bottom",
                fontsize=7, color=color, zorder=5)
    return line


def _kind_handles(kinds: Sequence[str]) -> list[Patch]:
    """Legend entries for block kinds, in the order of :data:`KIND_COLORS`."""
    order = [k for k in KIND_COLORS if k in kinds] + sorted(set(kinds) - set(KIND_COLORS))
    return [Patch(facecolor=KIND_COLORS.get(k, OTHER_COLOR), edgecolor="white", label=k)
            for k in order]


def _legend_outside(ax: Axes, handles: list) -> None:
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)


def _labelled_lines(ax: Axes) -> list[Line2D]:
    """The axes' lines that carry a legend label."""
    return [line for line in ax.get_lines() if line.get_label() and
            not line.get_label().startswith("_")]


def phase_labels(n_layers: int) -> list[str]:
    """Names of the level-2 phase steps: embed, F0..F(L-1), head, B(L-1)..B0."""
    return Steps(n_layers).labels()


def _step_ticks(ax: Axes, labels: Sequence[str]) -> None:
    """One tick per phase step at its centre; every k-th labelled when there are many."""
    every = max(1, -(-len(labels) // 40))
    keep = {0, len(labels) - 1} | {i for i, name in enumerate(labels) if name in ("embed", "head")}
    ax.set_xticks([i + 0.5 for i in range(len(labels))])
    ax.set_xticklabels([name if i % every == 0 or i in keep else "" for i, name in enumerate(labels)],
                       rotation=90 if len(labels) > 14 else 0, fontsize=7)
    ax.tick_params(axis="x", length=2)


def n_steps(lp: LevelPlan) -> int:
    """Steps the level spans: the last lifetime end."""
    return max((end for _, end in lp.lifetimes.values()), default=0)


def live_bytes(lp: LevelPlan) -> list[int]:
    """Sum of the sizes of the tensors live at each step (lifetimes are ``[start, end)``)."""
    live = [0] * n_steps(lp)
    for tid, (start, end) in lp.lifetimes.items():
        grow, grow_at = lp.grows.get(tid, (0, end))
        for step in range(start, end):
            live[step] += lp.sizes[tid] + (grow if step >= grow_at else 0)
    return live


def _step_line(ax: Axes, values: Sequence[float], *, label: str, color: str, gid: str) -> None:
    """``values[t]`` over ``[t, t+1)`` as a step line (bytes, drawn in MiB)."""
    if not values:
        return
    ys = [v / MIB for v in values] + [values[-1] / MIB]
    ax.plot(range(len(values) + 1), ys, drawstyle="steps-post", color=color, linewidth=1.4,
            label=label, gid=gid, zorder=4)


def _draw_blocks(ax: Axes, lp: LevelPlan, offsets: Mapping[str, int], *, names: bool) -> None:
    """One rectangle per tensor of ``lp`` at ``offsets``, coloured by kind; big ones named."""
    steps = max(n_steps(lp), 1)
    top = max((offsets[t] + lp.sizes[t] + lp.grows.get(t, (0, 0))[0] for t in lp.sizes),
              default=1)
    for tid, (start, end) in lp.lifetimes.items():
        y, h = offsets[tid] / MIB, lp.sizes[tid] / MIB
        grow, grow_at = lp.grows.get(tid, (0, end))
        # a growing block's later part lies right above it, or right below where it grows down
        y, extra = (y + grow / MIB, y) if tid in lp.grows_down else (y, y + h)
        color = KIND_COLORS.get(lp.kinds.get(tid, ""), OTHER_COLOR)
        ax.add_patch(Rectangle((start, y), end - start, h, facecolor=color, edgecolor="white",
                               linewidth=0.5, gid=f"block:{tid}", zorder=2))
        if grow:  # from its step on
            ax.add_patch(Rectangle((grow_at, extra), end - grow_at, grow / MIB, facecolor=color,
                                   edgecolor="white", linewidth=0.5, gid=f"grow:{tid}",
                                   zorder=2))
        if names and (end - start) / steps >= 0.05 and lp.sizes[tid] / top >= 0.05:
            ax.text(start + (end - start) / 2, y + h / 2, tid, ha="center", va="center",
                    fontsize=6, clip_on=True, zorder=3)
    ax.set_xlim(0, steps)


def _draw_level(ax: Axes, lp: LevelPlan, labels: Sequence[str] | None, *,
                names: bool = False) -> None:
    """The planned level: blocks, live bytes, peak and lower-bound lines, axes set up
    (``labels``: level-2 phase names; ``names``: write block names into big blocks)."""
    _draw_blocks(ax, lp, lp.offsets, names=names)
    _step_line(ax, live_bytes(lp), label="live bytes", color="black", gid="live")
    same = lp.peak == lp.lower_bound
    _hline(ax, lp.peak, color="#d62728", style="-", gid="peak",
           label=f"{'peak = lower bound' if same else 'peak (arena)'} {lp.peak / MIB:,.1f} MiB")
    _hline(ax, lp.lower_bound, color="#1f77b4", style=":", gid="lower_bound", left=True,
           label="" if same else f"lower bound {lp.lower_bound / MIB:,.1f} MiB")
    _mib_axis(ax, max(lp.peak, lp.lower_bound))
    if labels is not None:
        _step_ticks(ax, labels)
        ax.set_xlabel("phase step")
    else:
        ax.set_xlabel("request step")


# ---- level plots -----------------------------------------------------------------------------

def level_figure(lp: LevelPlan, *, title: str, labels: Sequence[str] | None = None) -> Figure:
    """A planned level as address over time (``labels``: level-2 phase names, else level 1)."""
    fig = _figure(11, 5.5)
    ax = fig.add_subplot()
    _draw_level(ax, lp, labels, names=labels is not None)
    ax.set_title(f"{title}\n{len(lp.offsets)} tensors, peak {lp.peak / MIB:,.1f} MiB, lower "
                 f"bound {lp.lower_bound / MIB:,.1f} MiB, solver: {lp.status}", fontsize=10)
    _legend_outside(ax, _kind_handles(list(lp.kinds.values())) + _labelled_lines(ax))
    return fig


def level_blocks(lp: LevelPlan) -> list[Block]:
    """The level's blocks rebuilt from the plan (ids are the plan's string ids)."""
    return [Block(id=tid, size=lp.sizes[tid], start=start, end=end,
                  grow=lp.grows.get(tid, (0, 0))[0], grow_at=lp.grows.get(tid, (0, 0))[1],
                  grows_down=tid in lp.grows_down)
            for tid, (start, end) in lp.lifetimes.items()]


def simulate_level(lp: LevelPlan) -> CachingResult:
    """PyTorch's caching allocator (simulated) on the level's blocks, in the plan's step order."""
    return simulate_caching_allocator(blocks_to_requests(level_blocks(lp)))


def reserved_bytes(lp: LevelPlan, result: CachingResult) -> list[int]:
    """Reserved bytes per step: each segment counts from the first step a tensor lives in it."""
    created = segment_steps(lp, result)
    reserved = [0] * n_steps(lp)
    for (_, size), first in zip(result.segments, created):
        for step in range(first, len(reserved)):
            reserved[step] += size
    return reserved


def segment_steps(lp: LevelPlan, result: CachingResult) -> list[int]:
    """The step at which each simulated segment was created (its earliest tensor's start)."""
    firsts = []
    for address, size in result.segments:
        starts = [lp.lifetimes[tid][0] for tid, off in result.offsets.items()
                  if address <= off < address + size]
        firsts.append(min(starts, default=0))
    return firsts


def caching_figure(lp: LevelPlan, *, title: str, labels: Sequence[str] | None = None) -> Figure:
    """The plan (left) beside the simulated caching allocator on the same blocks (right)."""
    result = simulate_level(lp)
    fig = _figure(14, 5.5)
    left, right = fig.subplots(1, 2, sharey=True)
    _draw_level(left, lp, labels)
    left.set_title(f"memoplan: peak {lp.peak / MIB:,.1f} MiB", fontsize=10)
    steps = max(n_steps(lp), 1)
    for (address, size), first in zip(result.segments, segment_steps(lp, result)):
        right.add_patch(Rectangle((first, address / MIB), steps - first, size / MIB,
                                  facecolor="#eeeeee", edgecolor="black", linewidth=0.8,
                                  gid="segment", zorder=1))
    _draw_blocks(right, lp, {str(k): v for k, v in result.offsets.items()}, names=False)
    _step_line(right, reserved_bytes(lp, result), label="reserved bytes", color="#7f7f7f",
               gid="reserved")
    _hline(right, result.reserved_peak, color="#d62728", style="-", gid="reserved_peak",
           label=f"reserved peak {result.reserved_peak / MIB:,.1f} MiB")
    _hline(right, lp.peak, color="#1f77b4", style="--", gid="plan_peak", left=True,
           label=f"memoplan peak {lp.peak / MIB:,.1f} MiB")
    right.set_ylim(0, max(result.reserved_peak, lp.peak) * 1.1 / MIB)
    right.set_xlabel(left.get_xlabel())
    if labels is not None:
        _step_ticks(right, labels)
    right.set_title(f"caching allocator (simulated): reserved {result.reserved_peak / MIB:,.1f} "
                    f"MiB, allocated peak {result.allocated_peak / MIB:,.1f} MiB", fontsize=10)
    ratio = result.reserved_peak / lp.peak if lp.peak else 1.0
    fig.suptitle(f"{title}: the caching allocator reserves {ratio:.2f}x the plan's peak "
                 f"(outlined boxes: its segments; grey: reserved but unused)", fontsize=11)
    _legend_outside(right, _kind_handles(list(lp.kinds.values()))
                    + [Patch(facecolor="#eeeeee", edgecolor="black", label="segment")]
                    + [ln for ln in left.get_lines() if ln.get_gid() == "live"]
                    + _labelled_lines(right))
    return fig


# ---- timeline --------------------------------------------------------------------------------

def plan_schedule(plan: Plan) -> list[Bar]:
    """The copy/compute bars of one iteration under ``plan`` (memoplan.timeline)."""
    p = plan.predicted
    return schedule(plan.layers, forward_s=p.forward_s, backward_s=p.backward_s,
                    token_wise_forward_s=p.token_wise_forward_s,
                    pcie_bytes_per_s=p.pcie_bytes_per_s)


def _draw_bar(ax: Axes, b: Bar, row: int, total_s: float) -> None:
    """One schedule bar (ms) in its row; stalls red and hatched; wide bars name their layer.
    Copies are edged in their own colour so that short ones stay visible as a line."""
    stall = b.kind == "stall"
    color = BAR_COLORS.get(b.kind, OTHER_COLOR)
    width = (b.end - b.start) * 1e3
    ax.add_patch(Rectangle((b.start * 1e3, row - 0.35), width, 0.7, facecolor=color,
                           edgecolor=STALL_EDGE if stall else color if b.stream != "compute"
                           else "white", hatch="///" if stall else None, linewidth=0.6,
                           gid=f"bar:{b.stream}:{b.kind}:{b.layer}"))
    if total_s and (b.end - b.start) / total_s >= 0.015:
        ax.text(b.start * 1e3 + width / 2, row, str(b.layer), ha="center", va="center",
                fontsize=6, color="black" if stall else "white")


def timeline_figure(plan: Plan) -> Figure:
    """Compute, D2H and H2D rows over one iteration; stalls in red."""
    bars = plan_schedule(plan)
    total = iteration_seconds(bars)
    fig = _figure(13, 3.6)
    ax = fig.add_subplot()
    rows = {s: len(STREAMS) - 1 - i for i, s in enumerate(STREAMS)}
    for b in bars:
        _draw_bar(ax, b, rows[b.stream], total)
    ax.set_xlim(0, max(total, 1e-9) * 1e3 * 1.01)
    ax.set_ylim(-0.6, len(STREAMS) - 0.4)
    ax.set_yticks([rows[s] for s in STREAMS], [STREAM_LABELS[s] for s in STREAMS])
    ax.set_xlabel("time (ms)")
    stall_s = sum(b.end - b.start for b in bars if b.kind == "stall")
    ax.set_title(f"one iteration, {len(plan.layers)} layers: {total * 1e3:,.1f} ms predicted, "
                 f"compute stalls {stall_s * 1e3:,.2f} ms (numbers: layer)", fontsize=10)
    kinds = {b.kind for b in bars}
    _legend_outside(ax, [Patch(facecolor=BAR_COLORS[k], label=k,
                               hatch="///" if k == "stall" else None,
                               edgecolor=STALL_EDGE if k == "stall" else "white")
                         for k in BAR_COLORS if k in kinds])
    return fig


# ---- real snapshots --------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SnapshotTrace:
    """The allocations of one device's trace: ``(address above base, size, first event, end
    event)`` per alloc event, the same for segments, over ``n_events`` trace events."""

    allocs: tuple[tuple[int, int, int, int], ...]
    segments: tuple[tuple[int, int, int, int], ...]
    n_events: int
    base: int
    device: int

    @property
    def peak_allocated(self) -> int:
        """The largest total of allocations live at one event."""
        delta = np.zeros(self.n_events + 1, dtype=np.int64)
        for _, size, start, end in self.allocs:
            delta[start] += size
            delta[end] -= size
        return int(np.cumsum(delta).max(initial=0))


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a memory snapshot "
                                     f"never does")


def load_snapshot(path: str | Path) -> SnapshotTrace:
    """Read a ``torch.cuda.memory._dump_snapshot`` pickle (see :func:`parse_snapshot`)."""
    path = Path(path)
    if not path.is_file():
        raise MemoplanError(f"No snapshot file at '{path}'. Check the path.")
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, ImportError, OverflowError) as e:
        raise MemoplanError(
            f"'{path}' is not a readable PyTorch memory snapshot ({type(e).__name__}: {e}). Write "
            f"it with torch.cuda.memory._dump_snapshot('snapshot.pickle') after "
            f"torch.cuda.memory._record_memory_history()."
        ) from e
    return parse_snapshot(data, source=str(path))


def _event_fields(event: Any, index: int, source: str) -> tuple[str, int, int]:
    """``(action, addr, size)`` of one trace event, validated."""
    if not isinstance(event, dict) or not isinstance(event.get("action"), str):
        raise MemoplanError(f"'{source}': trace event {index} is not an event with an 'action' "
                            f"(got {str(event)[:80]}). Is this a torch memory snapshot?")
    addr, size = event.get("addr", 0), event.get("size", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (addr, size)):
        raise MemoplanError(f"'{source}': trace event {index} ({event['action']}) has addr "
                            f"{addr!r} and size {size!r}; expected non-negative integers.")
    return event["action"], addr, size


def _pick_trace(data: Any, source: str) -> tuple[int, list]:
    """The first device trace that has events, with its device index."""
    if not isinstance(data, dict) or not {"segments", "device_traces"} <= data.keys():
        keys = sorted(map(str, data))[:6] if isinstance(data, dict) else type(data).__name__
        raise MemoplanError(
            f"'{source}' is not a PyTorch memory snapshot: expected a dict with 'segments' and "
            f"'device_traces' (torch.cuda.memory._snapshot()), got {keys}.")
    traces = data["device_traces"]
    if not isinstance(traces, list) or not isinstance(data["segments"], list):
        raise MemoplanError(f"'{source}': 'segments' and 'device_traces' must be lists.")
    for device, trace in enumerate(traces):
        if isinstance(trace, list) and trace:
            return device, trace
    raise MemoplanError(
        f"'{source}' has no allocation trace. Call "
        f"torch.cuda.memory._record_memory_history() before the iteration you snapshot.")


def _close(open_: dict[int, list[int]], addr: int, end: int, out: list) -> None:
    """Move the open entry at ``addr`` to ``out`` as ``(addr, size, start, end)``."""
    start, size, _ = open_.pop(addr)
    out.append((addr, size, start, end))


def _end_of(entry: list[int], fallback: int) -> int:
    """Where an allocation whose free never completed ends: its free request, else ``fallback``."""
    return entry[2] if entry[2] >= 0 else fallback


def _segments_before(segments: list, device: int, seen: set[int], n: int) -> list:
    """Segments of ``device`` in the snapshot's ``segments`` whose creation the trace did not
    record (not in ``seen``): live over all ``n`` events."""
    out = []
    for seg in segments:
        if not isinstance(seg, dict) or seg.get("device", device) != device:
            continue
        address, size = seg.get("address"), seg.get("total_size")
        if isinstance(address, int) and isinstance(size, int) and address not in seen:
            out.append((address, size, 0, n))
    return out


def parse_snapshot(data: Any, *, source: str = "snapshot") -> SnapshotTrace:
    """Allocations of a ``torch.cuda.memory._snapshot()`` dict over its trace's event index.

    Each ``alloc`` lives until the ``free_completed`` (or older traces' ``free``) of its address,
    else its ``free_requested``, else the end of the trace; segments from ``segment_alloc`` /
    ``segment_map`` to their free, and those still in ``segments`` that the trace never saw
    created over the whole trace. Addresses are relative to the lowest segment address.
    """
    device, trace = _pick_trace(data, source)
    allocs: list[tuple[int, int, int, int]] = []
    segs: list[tuple[int, int, int, int]] = []
    live: dict[int, list[int]] = {}       # addr -> [start, size, free_requested index or -1]
    live_segs: dict[int, list[int]] = {}
    for i, event in enumerate(trace):
        action, addr, size = _event_fields(event, i, source)
        if action == "alloc":
            if addr in live:  # reused before its free completed
                _close(live, addr, _end_of(live[addr], i), allocs)
            live[addr] = [i, size, -1]
        elif action == "free_requested" and addr in live:
            live[addr][2] = i
        elif action in ("free_completed", "free") and addr in live:  # "free": older traces
            _close(live, addr, i, allocs)
        elif action in ("segment_alloc", "segment_map"):
            live_segs[addr] = [i, size, -1]
        elif action in ("segment_free", "segment_unmap"):
            if addr in live_segs:
                _close(live_segs, addr, i, segs)
            else:
                segs.append((addr, size, 0, i))
    n = len(trace)
    for addr in list(live):
        _close(live, addr, _end_of(live[addr], n), allocs)
    for addr in list(live_segs):
        _close(live_segs, addr, n, segs)
    segs += _segments_before(data["segments"], device, {s[0] for s in segs}, n)
    if not allocs:
        raise MemoplanError(f"'{source}' has a trace but no 'alloc' events on device {device}: "
                            f"nothing to draw.")
    base = min(a[0] for a in allocs + segs)  # the lowest segment's address when all are known
    allocs.sort(key=lambda a: a[2])
    return SnapshotTrace(allocs=tuple((a - base, s, b, max(e, b + 1)) for a, s, b, e in allocs),
                         segments=tuple((a - base, s, b, e) for a, s, b, e in segs),
                         n_events=n, base=base, device=device)


def snapshot_figure(snap: SnapshotTrace, plan: Plan) -> Figure:
    """The snapshot's allocations (left) beside the planned iteration (right), same y scale,
    the plan's arena drawn on both."""
    fig = _figure(15, 6)
    left, right = fig.subplots(1, 2, sharey=True)
    for addr, size, start, end in snap.segments:
        left.add_patch(Rectangle((start, addr / MIB), end - start, size / MIB, facecolor="#f4f4f4",
                                 edgecolor="black", linewidth=0.6, gid="segment", zorder=1))
    verts = np.array([[(s, a), (s, a + z), (e, a + z), (e, a)]
                      for a, z, s, e in snap.allocs], dtype=float)
    verts[:, :, 1] /= MIB
    palette = colormaps["tab20"].colors  # one colour per allocation, cycling, as PyTorch's viewer
    left.add_collection(PolyCollection(verts, facecolors=[palette[i % len(palette)] for i in
                                                          range(len(snap.allocs))],
                                       edgecolors="white", linewidths=0.2, gid="allocs", zorder=2))
    left.set_xlim(0, max(snap.n_events, 1))
    it = plan.levels["iteration"]
    _draw_level(right, it, phase_labels(len(plan.layers)))
    top = max([plan.arena_bytes, it.lower_bound] + [a + z for a, z, _, _ in snap.allocs]
              + [a + z for a, z, _, _ in snap.segments])
    for ax in (left, right):  # on the right the label goes left, clear of the peak's
        _hline(ax, plan.arena_bytes, color="#d62728", style="--", gid="arena", left=ax is right,
               label=f"plan arena {plan.arena_bytes / MIB:,.1f} MiB")
    _mib_axis(left, top)
    left.set_xlabel("trace event")
    left.set_title(f"actual (snapshot, device {snap.device}): {len(snap.allocs)} allocations, "
                   f"peak allocated {snap.peak_allocated / MIB:,.1f} MiB", fontsize=10)
    right.set_title(f"memoplan plan: arena {plan.arena_bytes / MIB:,.1f} MiB", fontsize=10)
    fig.suptitle("real allocations (outlined: cudaMalloc segments) beside the planned iteration",
                 fontsize=11)
    _legend_outside(right, _kind_handles(list(it.kinds.values())))
    return fig


# ---- sweep -----------------------------------------------------------------------------------

def sweep_strategies_figure(rows: Sequence[Any], *, gpu_mem_bytes: float,
                            title: str | None = None) -> Figure:
    """``memoplan sweep --plot``: predicted MFU of every strategy (plan, keep-all, full recompute,
    offload-all) against sequence length (left) and their GPU memory (right).

    ``rows`` are :class:`memoplan.sweep.SweepRow`. A strategy's MFU line is solid where it fits
    and dotted, faded, where it does not; a cross marks the first length past its longest fit,
    annotated with what stops it there (GPU memory, host memory, PCIe). The plan's limit at
    length it fits is written under its point (artist gids ``mfu:<strategy>``, ``stop:<strategy>``,
    ``limit:<seq>``).
    """
    from memoplan.sweep import STRATEGIES, strategy_summary

    names = {"gpu": "GPU memory", "host": "host memory", "pcie": "PCIe", "none": ""}
    styles = {**STRATEGY_STYLE, "offload_all": ("offload all", "#f28e2b", "D-.")}
    summary = strategy_summary(rows)
    fig = _figure(12, 4.8)
    mfu_ax, mem_ax = fig.subplots(1, 2, sharex=True)
    for key in STRATEGIES:
        label, color, style = styles[key]
        info = summary[key]
        pts = [(x, m, f) for x, m, f in zip(info["seq"], info["mfu"], info["fits"]) if m is not None]
        fit = [(x, m) for x, m, f in pts if f]
        if fit:
            mfu_ax.plot(*zip(*fit), style, color=color, label=label, gid=f"mfu:{key}")
        else:
            mfu_ax.plot([], [], style, color=color, label=f"{label} (never fits)", gid=f"mfu:{key}")
        if pts:
            mfu_ax.plot([x for x, _, _ in pts], [m for _, m, _ in pts], ":", color=color,
                        alpha=0.35, gid=f"mfu_all:{key}")
        if info["stops_at"] is not None:
            stop = info["seq"].index(info["stops_at"])
            y = info["mfu"][stop]
            if y is None:  # the plan where it does not fit: no MFU, mark on the axis
                y = 0.0
            mfu_ax.plot([info["stops_at"]], [y], "X", color=color, markersize=11, mec="black",
                        mew=0.8, gid=f"stop:{key}")
            mfu_ax.annotate(f"{label}: {names.get(info['stopped_by'], info['stopped_by'])}",
                            (info["stops_at"], y), textcoords="offset points", xytext=(6, 6),
                            fontsize=7, color=color)
        mem = [(r.seq, r.gpu_bytes[key] / GIB) for r in rows
               if r.gpu_bytes and key in r.gpu_bytes]
        if mem:
            mem_ax.plot(*zip(*mem), style, color=color, label=label, gid=f"mem:{key}")
    for r in rows:  # the plan's limit at each length it fits, under its point
        lim = r.limit
        if r.fits and lim != "none":
            y = r.mfu["plan"]
            mfu_ax.annotate(names.get(lim, lim), (r.seq, y), textcoords="offset points",
                            xytext=(0, -12), ha="center", fontsize=7, color="#4e79a7",
                            gid=f"limit:{r.seq}")
    mem_ax.axhline(gpu_mem_bytes / GIB, color="black", linewidth=1, label="GPU memory",
                   gid="gpu_mem")
    for ax in (mfu_ax, mem_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks([r.seq for r in rows], [fmt_tokens(r.seq) for r in rows])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(alpha=0.3)
    mfu_ax.legend(fontsize=8, loc="lower left")
    mem_ax.legend(fontsize=8, loc="upper left")
    mfu_ax.set_ylabel("predicted MFU")
    mfu_ax.set_ylim(bottom=0)
    mem_ax.set_yscale("log")
    mem_ax.set_ylabel("GiB per GPU (log scale)")
    mfu_ax.set_title("predicted MFU (dotted: does not fit; X: stops fitting, and why; "
                     "under the plan: its limit)", fontsize=9)
    mem_ax.set_title("GPU memory per GPU (model states included)", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---- all of a plan ---------------------------------------------------------------------------

def plan_figures(plan: Plan, snapshot: SnapshotTrace | None = None) -> dict[str, Figure]:
    """Every picture of ``plan`` by file stem: the levels, their caching comparisons, the
    timeline, and with ``snapshot`` the overlay."""
    c = plan.config
    where = f"{fmt_tokens(int(c['seq']))} tokens, {c['tokens_per_gpu']:,} per GPU"
    figures: dict[str, Figure] = {}
    for name, lp in plan.levels.items():
        labels = phase_labels(len(plan.layers)) if name == "iteration" else None
        what = "level 2: one iteration" if name == "iteration" else f"level 1: one layer's {name}"
        title = f"{name} ({what}; {where})"
        figures[name] = level_figure(lp, title=title, labels=labels)
        figures[f"caching_{name}"] = caching_figure(lp, title=name, labels=labels)
    figures["timeline"] = timeline_figure(plan)
    if snapshot is not None:
        figures["snapshot"] = snapshot_figure(snapshot, plan)
    return figures


def write_pngs(figures: Mapping[str, Figure], out_dir: str | Path) -> list[Path]:
    """Save each figure as ``<out_dir>/<name>.png``; returns the paths in order."""
    out = Path(out_dir)
    paths = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            path = out / f"{name}.png"
            fig.savefig(path, dpi=DPI)
            paths.append(path)
    except OSError as e:
        raise MemoplanError(f"Cannot write the pictures into '{out}' ({e.strerror or e}). "
                            f"Pick another folder with -o.") from e
    return paths
