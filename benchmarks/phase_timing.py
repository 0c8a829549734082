"""Where one training step's time goes under a plan, phase by phase, read from a profiler trace.

Trains the layer stack of ``stack_model.py`` under a plan for ``--seq`` tokens (solved here for
one H200 whose host memory is ``--host-mem-gb``; the host slab is made, and on a GPU pinned,
before any step), runs ``--warmup`` steps, then one step under ``torch.profiler`` (CPU, and on a
GPU CUDA, activity), exports it as a chrome trace and reads that back. The runtime names its
phases ``memoplan:forward[i]`` (device-to-host copies are launched in it), ``recompute[i]``,
``backward[i]`` and ``prefetch[i]`` (host-to-device copies of layer i, started during layer
i+1's backward). Two tables:

Per phase: its CPU time; on a GPU the span of its work on the compute stream (the stream with
the most kernel time) and the kernel time in it, the compute stream's idle time (from its
previous op to the phase's first, and between the phase's ops), the part of that idle time in
gaps during which a copy ended (waiting for copies), the bytes and bandwidth of the copies it
launched, and how far the host ran ahead (the phase's first GPU op start minus its CPU start).
GPU work is attributed to a phase by the ``gpu_user_annotation`` ranges Kineto emits for each
``record_function`` (the ops of that stream inside the range), or where a trace has none, by
correlation ids (the op's launch call inside the phase's CPU range).

Per step: wall time, achieved device-to-host and host-to-device GB/s (sum of bytes over sum of
copy durations, per direction), compute idle time in the backward phases, recompute time per
layer (GPU kernel time, or CPU time on a CPU), how far the host ran ahead at most, the seconds
the host slab took to make and pin, and ``cudaHostRegister`` seconds per GiB; beside the plan's
swap fractions and its predicted step, copy and recompute times.

On a CPU the GPU-only cells are "n/a": the table then shows the CPU ranges (CI smoke).

    python benchmarks/phase_timing.py --preset 7b --layers 2 --seq 65536 --device cuda \\
        --trace /tmp/phases-64k.json --out benchmarks/results/gpu-phases-7b.md
    python benchmarks/phase_timing.py --device cpu                      # smoke (CI)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memoplan.runtime as runtime  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.stack_model import Stack  # noqa: E402

PHASE = re.compile(r"^memoplan:(forward|recompute|backward|prefetch)\[(\d+)\]$")
GPU_OPS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cuda_runtime", "cuda_driver")
SLACK_US = 1.0  # an op may start this much before its annotation (rounding in the trace)
COLUMNS = ("phase", "CPU ms", "GPU ms", "kernel ms", "idle ms", "idle at copies ms",
           "copies GiB", "copy GB/s", "host ahead ms")
NA = "n/a"


def step(stack, inputs) -> None:
    x, cos, sin = inputs
    stack.zero_grad(set_to_none=True)
    stack(x.detach().requires_grad_(), cos, sin).float().pow(2).mean().backward()


def _end(e: dict) -> float:
    return e["ts"] + e.get("dur", 0)


def _stream(e: dict) -> tuple:
    return (e.get("pid"), e.get("tid"))


def _direction(e: dict) -> str | None:
    name = e.get("name", "")
    return "D2H" if "DtoH" in name else "H2D" if "HtoD" in name else None


def attribute(events: list[dict]) -> dict[str, list[dict]]:
    """Phase name -> the GPU ops (kernels, copies, memsets) of that phase: the ops of a stream
    inside the phase's ``gpu_user_annotation`` range on that stream, and the ops whose launch
    call (same correlation id) lies inside the phase's CPU range (either way suffices: a trace
    may lack annotations on some streams)."""
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_OPS]
    by_stream: dict[tuple, list[dict]] = defaultdict(list)
    for e in ops:
        by_stream[_stream(e)].append(e)
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for a in events:
        if a.get("cat") == "gpu_user_annotation" and PHASE.match(a.get("name", "")):
            for e in by_stream[_stream(a)]:
                if a["ts"] - SLACK_US <= e["ts"] < _end(a):
                    found[a["name"]][id(e)] = e
    launch = {e["args"]["correlation"]: e for e in events
              if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})}
    cpu = [r for r in events if r.get("cat") == "user_annotation"
           and PHASE.match(r.get("name", ""))]
    for e in ops:
        call = launch.get(e.get("args", {}).get("correlation"))
        if call is None:
            continue
        for r in cpu:
            if r.get("tid") == call.get("tid") and r["ts"] <= call["ts"] < _end(r):
                found[r["name"]][id(e)] = e
                break
    return {name: list(got.values()) for name, got in found.items()}


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def analyse(events: list[dict]) -> dict:
    """Per phase and per step figures from a chrome trace's events (times in ms, GPU figures
    None where the trace has no GPU op); see the module docstring."""
    ranges = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
              and PHASE.match(e.get("name", ""))]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    copies = [e for e in events if e.get("ph") == "X" and e.get("cat") == "gpu_memcpy"
              and _direction(e)]
    busy: dict[tuple, float] = defaultdict(float)
    for k in kernels:
        busy[_stream(k)] += k.get("dur", 0)
    compute = max(busy, key=busy.get) if busy else None
    timeline = _merged([(e["ts"], _end(e)) for e in events if e.get("ph") == "X"
                        and e.get("cat") in GPU_OPS and _stream(e) == compute])
    copy_ends = sorted(_end(c) for c in copies)
    of = attribute(events)
    phases: dict[str, dict] = {}
    for r in sorted(ranges, key=lambda r: r["ts"]):
        p = phases.setdefault(r["name"], {"cpu_ms": 0.0, "cpu_start": r["ts"]})
        p["cpu_ms"] += r.get("dur", 0) / 1e3
    for name, p in phases.items():
        ops = of.get(name, [])
        mine = [e for e in ops if _stream(e) == compute]
        moved = [e for e in ops if e.get("cat") == "gpu_memcpy" and _direction(e)]
        p.update(gpu_ms=None, kernel_ms=None, idle_ms=None, idle_copy_ms=None, ahead_ms=None,
                 copy_bytes=sum(e.get("args", {}).get("bytes", 0) for e in moved) if moved
                 else None, copy_us=sum(e.get("dur", 0) for e in moved))
        if ops:
            p["ahead_ms"] = (min(e["ts"] for e in ops) - p["cpu_start"]) / 1e3
        if mine:
            start, end = min(e["ts"] for e in mine), max(_end(e) for e in mine)
            p["gpu_ms"] = (end - start) / 1e3
            p["kernel_ms"] = sum(e.get("dur", 0) for e in mine if e.get("cat") == "kernel") / 1e3
            gaps = _gaps(timeline, start, end)
            p["idle_ms"] = sum(b - a for a, b in gaps) / 1e3
            p["idle_copy_ms"] = sum(b - a for a, b in gaps
                                    if any(a < t <= b for t in copy_ends)) / 1e3
    step = {}
    for d in ("D2H", "H2D"):
        moved = [c for c in copies if _direction(c) == d]
        nbytes = sum(c.get("args", {}).get("bytes", 0) for c in moved)
        us = sum(c.get("dur", 0) for c in moved)
        step[d] = {"bytes": nbytes if moved else None,
                   "gbps": nbytes / us / 1e3 if moved and us else None}
    step["pageable"] = sum("Pageable" in c.get("name", "") for c in copies)
    return {"phases": phases, "step": step, "gpu": compute is not None}


def _gaps(timeline: list[tuple[float, float]], start: float,
          end: float) -> list[tuple[float, float]]:
    """Idle intervals of the stream whose busy ``timeline`` (merged intervals) is given, from
    the end of its last op before ``start`` to ``end``."""
    earlier = [b for a, b in timeline if a < start]  # the stream's ops begun before the phase
    at = min(start, max(earlier)) if earlier else start
    gaps = []
    for a, b in timeline:
        if b <= at or a >= end:
            continue
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    return gaps


def fmt(v, spec: str = ".2f") -> str:
    return NA if v is None else format(v, spec)


def render(res: dict, info: dict) -> str:
    """The two markdown tables (and a caption) of one run."""
    phases, gpu = res["phases"], res["gpu"]
    caption = info["caption"]
    if info["pinned"] and not gpu:
        caption += " The trace has no GPU activity (CUPTI missing?): GPU cells are n/a."
    lines = [caption, "", "| " + " | ".join(COLUMNS) + " |",
             "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for name in sorted(phases, key=lambda n: phases[n]["cpu_start"]):  # as the step ran
        p = phases[name]
        gb = p["copy_bytes"]
        rate = gb / p["copy_us"] / 1e3 if gb and p["copy_us"] else None
        cells = [name, fmt(p["cpu_ms"]), fmt(p["gpu_ms"]), fmt(p["kernel_ms"]), fmt(p["idle_ms"]),
                 fmt(p["idle_copy_ms"]), fmt(gb / common.GiB if gb is not None else None, ".3f"),
                 fmt(rate, ".1f"), fmt(p["ahead_ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    back = [p for n, p in phases.items() if n.split("[")[0] in ("memoplan:backward",
                                                                  "memoplan:recompute")]
    idle = sum(p["idle_ms"] for p in back if p["idle_ms"] is not None) if gpu else None
    idle_copy = sum(p["idle_copy_ms"] for p in back if p["idle_copy_ms"] is not None) \
        if gpu else None
    recompute = []
    for name in sorted((n for n in phases if "recompute" in n),
                       key=lambda n: int(PHASE.match(n).group(2))):
        p = phases[name]
        ms = (p["kernel_ms"] or 0.0) if gpu else p["cpu_ms"]  # GPU: a kept layer's is 0
        recompute.append(f"{PHASE.match(name).group(2)}: {ms:.2f}")
    ahead = [p["ahead_ms"] for p in phases.values() if p["ahead_ms"] is not None]
    pin, slab = info["pin_seconds"], info["slab_bytes"]
    per_gib = pin / (slab / common.GiB) if info["pinned"] and slab else None
    d2h, h2d = res["step"]["D2H"], res["step"]["H2D"]
    rows = [
        ("step ms (wall, under the profiler)", fmt(info["step_ms"])),
        ("D2H GB/s (sum bytes / sum copy time)", fmt(d2h["gbps"], ".1f")),
        ("D2H GiB", fmt(d2h["bytes"] / common.GiB if d2h["bytes"] is not None else None, ".3f")),
        ("H2D GB/s", fmt(h2d["gbps"], ".1f")),
        ("H2D GiB", fmt(h2d["bytes"] / common.GiB if h2d["bytes"] is not None else None, ".3f")),
        ("compute idle in recompute + backward ms", fmt(idle)),
        ("of which in gaps where a copy ended ms", fmt(idle_copy)),
        (f"recompute ms per layer ({'GPU kernels' if gpu else 'CPU'})",
         ", ".join(recompute) or NA),
        ("host ahead of the GPU, max ms", fmt(max(ahead) if ahead else None)),
        ("copies to or from pageable host memory", res["step"]["pageable"] if gpu else NA),
        ("host slab MiB", fmt(slab / 2**20, ".1f")),
        ("slab made and pinned s" if info["pinned"] else "slab made s (not pinned)",
         fmt(pin, ".3f")),
        ("cudaHostRegister s/GiB", fmt(per_gib, ".3f")),
        ("plan: modes / alphas", info["modes"]),
        ("plan: predicted step ms", fmt(info["predicted_step_ms"])),
        ("plan: predicted copy ms (largest layer) / recompute ms / stall ms (step)",
         info["predicted_layer"]),
    ]
    lines += ["", "| measure | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=1, help="steps before the profiled one")
    ap.add_argument("--alpha", type=float, default=None, help="force this swap fraction")
    common.add_plan_options(ap)
    ap.add_argument("--trace", type=Path, default=None, help="keep the chrome trace here")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    mod = common.load_example(args.preset, args.layers)
    prof = common.stack_profile(args.device, args.profile_seq or
                                common.default_profile_seq(args.preset), args.profile)
    plan = common.solve(prof, args.seq, args.host_mem_gb, args.time_limit, alpha=args.alpha,
                        state_bytes_per_param=args.state_bytes)
    # the layers only, on the device first: apply() pins the slab now
    stack = runtime.apply(Stack(mod.build_model()).to(device), plan)
    runtime.prepare(stack, args.seq)
    inputs = common.make_inputs(mod, args.seq, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step(stack, inputs)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof_run:
        began = time.perf_counter()
        step(stack, inputs)
        sync()
        wall = time.perf_counter() - began
    trace = args.trace or Path(tempfile.mkdtemp(prefix="memoplan-phases-")) / "trace.json"
    prof_run.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    res = analyse(events)
    rt = runtime.stats(stack)
    pred = plan.predicted
    info = {
        "caption": f"{args.preset} x {args.layers} layers, {args.seq} tokens on {args.device}: "
                   f"one step after {args.warmup} warm-up step(s), under torch.profiler; plan "
                   f"for one H200 ({plan.solver['backend']}).",
        "step_ms": wall * 1e3, "pin_seconds": rt["pin_seconds"],
        "slab_bytes": rt["host_slab_bytes"], "pinned": cuda,
        "modes": ", ".join(f"{l.mode} {l.alpha:.2f}" for l in plan.layers),
        "predicted_step_ms": pred.iteration_s["plan"] * 1e3,
        "predicted_layer": f"{pred.copy_s * 1e3:.2f} / {pred.recompute_s * 1e3:.2f} / "
                           f"{pred.stall_s * 1e3:.2f}"}
    text = render(res, info)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
