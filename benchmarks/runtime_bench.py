"""Benchmark of training strategies on a stack of Llama-shaped layers, side by side in one run.

Strategies: keep-all (plain autograd), full recompute (``torch.utils.checkpoint`` per layer),
``save_on_cpu`` (pinned on a GPU), a naive async offload (every saved tensor >= 1 MiB copied to
host on a side stream, brought back on demand), memoplan with PyTorch's caching allocator, and
(on a GPU) memoplan with its planned allocator, which must be installed before the process's
first CUDA allocation and so runs in a child process of this one. The layers are profiled on the
device they run on and the plan is solved here (greedy addresses where python-mip is missing),
for one H200 whose host memory is ``--host-mem-gb`` (default: the preset's, or 0.8 x this box's
available memory when that is less).

Prints per strategy and length: seconds per layer (forward + backward, best of the timed steps;
the first step is a warm-up), the ratio to keep-all, MFU (GPU; model FLOPs = 3 x forward, from
the profile), MFU over full recompute's; device memory (GPU; model weights included): peak
allocated and reserved (``torch.cuda``'s peaks, or under the planned allocator
``memoplan.runtime.memory_stats()["total"]``), and under the planned allocator the arena's peak
(planned tensors live), the pool's peak (what CUDA's pool served, the arena buffer included),
the pool's peak over the plan's figure (positive: memory left the plan) and the allocator's
request counters (planned / placed in a phase's block / unplanned); then host memory pinned and
the seconds pinning took (before the timed steps: ``apply`` pins for a model on the GPU), the
bytes of real tensors the runtime's programs keep after the steps (0 expected), the largest
relative gradient difference against keep-all, and for memoplan the peak allocated over the
plan's predicted device bytes.

Gradients: only keep-all's are kept (in their dtype, on the CPU); every other strategy is
compared with them right after it runs. The parent's memoplan run is undone (layers unwrapped,
runtime dropped, pinned slab freed) before the child starts, so the child can pin its own.

    python benchmarks/runtime_bench.py --quick                          # CPU smoke (CI)
    python benchmarks/runtime_bench.py --preset 7b --layers 2 --seq 65536 131072 --device cuda \\
        --out benchmarks/results/gpu-runtime-7b.md
    python benchmarks/runtime_bench.py --preset 7b --layers 32 --seq 131072 --device cuda \\
        --strategies "full recompute" memoplan "memoplan + planned allocator"

No GPU row has been measured yet (no GPU in the sessions that wrote this); on a CPU the table
shows the schedule's overhead, not its GPU speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memoplan.runtime as runtime  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.common import gib  # noqa: E402
from benchmarks.stack_model import Stack  # noqa: E402  (what is trained, and profiled)

STRATEGIES = ("keep-all", "full recompute", "save_on_cpu", "naive offload", "memoplan",
              "memoplan + planned allocator")
PEAK_FLOPS = {"cuda": 989e12}  # H200 bf16 dense
COLUMNS = ("S", "strategy", "s/layer", "vs keep-all", "MFU", "vs full recompute",
           "peak alloc GiB", "peak reserved GiB", "arena peak GiB", "pool peak GiB",
           "pool over plan GiB", "planned / in block / unplanned", "pinned GiB", "pin s",
           "trace bytes", "max rel grad diff", "peak / plan")


def naive_offload_hooks(device: torch.device):
    stream = torch.cuda.Stream() if device.type == "cuda" else None

    def pack(t):
        if t.numel() * t.element_size() < 2**20:
            return t
        if stream is None:
            return ("host", t.to("cpu", copy=True))
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            host = t.to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        t.record_stream(stream)
        return ("host", host, done)

    def unpack(p):
        if not isinstance(p, tuple):
            return p
        if len(p) == 3:  # the copy back must not start before the copy out has landed
            torch.cuda.current_stream().wait_event(p[2])
        return p[1].to(device, non_blocking=True)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def run(stack, inputs, strategy: str, steps: int, device: torch.device, *, ref=None,
        keep_grads: bool = False, planned: bool = False) -> dict:
    """Train ``steps`` steps; the first is a warm-up. Best time, memory peaks (``planned``: from
    the planned allocator), the largest relative gradient difference against ``ref`` (keep-all's
    gradients), and with ``keep_grads`` the gradients themselves, in their dtype, on the CPU."""
    x, cos, sin = inputs
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if planned:  # torch.cuda's memory statistics raise under a pluggable allocator
        runtime.reset_peak_memory_stats()
    elif cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        stack.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        sync()
        began = time.perf_counter()
        if strategy == "save_on_cpu":
            ctx = torch.autograd.graph.save_on_cpu(pin_memory=cuda)
        elif strategy == "naive offload":
            ctx = naive_offload_hooks(device)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            out = stack(xi, cos, sin, "recompute" if strategy == "full recompute" else "keep")
        out.float().pow(2).mean().backward()
        del out
        sync()
        times.append(time.perf_counter() - began)
    result: dict = {"seconds": min(times[1:] if len(times) > 1 else times)}
    if planned:  # peaks first: comparing gradients below allocates too
        ms = runtime.memory_stats()
        result.update(alloc=ms["total"]["allocated_peak"], reserved=ms["total"]["reserved_peak"],
                      arena_peak=ms["arena"]["allocated_peak"],
                      pool_peak=ms["pool"]["allocated_peak"])
    elif cuda:
        result.update(alloc=torch.cuda.max_memory_allocated(),
                      reserved=torch.cuda.max_memory_reserved())
    grads = [p.grad for p in stack.parameters()]
    if ref is not None:
        result["diff"] = max_rel_diff(grads, ref)
    if keep_grads:
        result["grads"] = [g.detach().cpu() for g in grads]
    if strategy.startswith("memoplan"):
        rt = runtime.stats(stack)
        result["trace_bytes"] = common.trace_bytes(stack)
        if cuda:  # on a CPU the slab is not pinned
            result["pinned"] = rt["host_slab_bytes"] + rt["host_extra_bytes"]
            result["pin_seconds"] = rt["pin_seconds"]
        if "allocator" in rt:
            result["allocator"] = rt["allocator"]
    stack.zero_grad(set_to_none=True)
    return result


def max_rel_diff(grads, ref) -> float:
    """max over parameters of max|a - b| / max|b|, computed in float32 one parameter at a time
    on the gradients' device (``ref`` may be on the CPU, in any dtype)."""
    worst = 0.0
    for a, b in zip(grads, ref):
        a = a.detach().float()
        b = b.to(a.device).float()
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def run_memoplan(stack, plan, seq: int, inputs, args, device: torch.device, ref) -> dict:
    """memoplan with PyTorch's allocator on the stack's layers, the host slab made (and pinned,
    on a GPU) before the first step. Afterwards the layers are unwrapped and the runtime (its
    pinned slab, arena and programs) is dropped: a child process may pin its own next."""
    target = runtime.apply(Stack(stack), plan)  # another Stack over the same layers
    runtime.prepare(target, seq)
    try:
        result = run(target, inputs, "memoplan", args.steps, device, ref=ref)
    finally:
        for layer in stack.layers:
            layer.__dict__.pop("forward", None)
    runner = weakref.ref(target._memoplan_runner)  # noqa: SLF001
    del target
    gc.collect()
    if runner() is not None:
        print("runtime_bench: memoplan's runtime is still referenced after its run; its pinned "
              "host slab stays (the child's pinning may fail)", file=sys.stderr)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def worker(args) -> None:
    """Child process: memoplan with the planned allocator, installed before any CUDA tensor."""
    runtime.install_allocator()
    device = torch.device("cuda")
    mod = common.load_example(args.preset, args.layers)
    stack = Stack(mod.build_model()).to(device)  # the layers only, on the GPU first: apply()
    runtime.apply(stack, runtime.load_plan(args.worker_plan))  # pins the slab now
    runtime.prepare(stack, args.seq[0])
    ref_path = Path(args.worker_plan).with_suffix(".grads.pt")
    ref = torch.load(ref_path) if ref_path.exists() else None
    result = run(stack, common.make_inputs(mod, args.seq[0], device),
                 "memoplan + planned allocator", args.steps, device, ref=ref, planned=True)
    print("WORKER " + json.dumps(result))


def in_child(args, seq: int, plan_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker-plan", str(plan_path), "--preset", args.preset,
           "--layers", str(args.layers), "--seq", str(seq), "--steps", str(args.steps)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.child_timeout} s"}
    line = next((l for l in done.stdout.splitlines() if l.startswith("WORKER ")), None)
    if done.returncode != 0 or line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[-300:] or f"exit {done.returncode}"}
    return json.loads(line[len("WORKER "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=[512])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    common.add_plan_options(ap)
    ap.add_argument("--child-timeout", type=int, default=900)
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, 2 lengths, 2 steps, 2 s per MIP (CI)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    ap.add_argument("--worker-plan", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_plan:
        return worker(args)
    if args.quick:
        args.preset, args.seq, args.steps, args.time_limit = "tiny", [256, 512], 2, 2.0
    device = torch.device(args.device)
    strategies = [s for s in STRATEGIES if s in args.strategies]  # keep-all first: the reference
    if device.type != "cuda" and "memoplan + planned allocator" in strategies:
        strategies.remove("memoplan + planned allocator")  # it places CUDA tensors only
    if args.host_mem_gb is None:
        from memoplan.hardware import get_hardware

        args.host_mem_gb = common.default_host_mem_gb(get_hardware("h200").host_mem_gb)

    mod = common.load_example(args.preset, args.layers)
    # the stack's own file: the plan then budgets what the stack holds outside the arena
    prof = common.stack_profile(args.device, args.profile_seq or
                                common.default_profile_seq(args.preset), args.profile)
    stack = Stack(mod.build_model()).to(device)  # the layers only (no embedding, no head)
    tmp = Path(tempfile.mkdtemp(prefix="memoplan-bench-"))
    rows = [f"{args.preset} x {args.layers} layers on {args.device}, {args.steps} steps (the "
            f"first a warm-up); plans for one H200 with {args.host_mem_gb:.1f} GiB of host "
            f"memory, state bytes {args.state_bytes:g} per parameter.", "",
            "| " + " | ".join(COLUMNS) + " |",
            "|" + "|".join("---" if c == "strategy" else "---:" for c in COLUMNS) + "|"]
    for seq in args.seq:
        inputs = common.make_inputs(mod, seq, device)
        flops = args.layers * 3 * prof.layer.flops_forward.total_at(seq)
        plan = common.solve(prof, seq, args.host_mem_gb, args.time_limit,
                            state_bytes_per_param=args.state_bytes)
        plan_path = common.write_plan(plan, tmp / f"plan-{seq}.json")
        results: dict[str, dict] = {}
        ref = None
        for strategy in strategies:
            if strategy == "memoplan + planned allocator":
                continue  # after the others, in a fresh process
            try:
                if strategy == "memoplan":
                    results[strategy] = run_memoplan(stack, plan, seq, inputs, args, device, ref)
                else:
                    results[strategy] = run(stack, inputs, strategy, args.steps, device, ref=ref,
                                            keep_grads=strategy == "keep-all")
            except torch.cuda.OutOfMemoryError:
                results[strategy] = {"error": "out of memory"}
            except Exception as e:  # noqa: BLE001  (a row, and the other strategies still run)
                traceback.print_exc()
                results[strategy] = {"error": f"{type(e).__name__}: {e}"[:300].replace("\n", " / ")}
            if strategy == "keep-all" and "grads" in results[strategy]:
                ref = results[strategy].pop("grads")
                results[strategy]["diff"] = 0.0
                torch.save(ref, plan_path.with_suffix(".grads.pt"))
            gc.collect()
        if "memoplan + planned allocator" in strategies:
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results["memoplan + planned allocator"] = in_child(args, seq, plan_path)
            inputs = common.make_inputs(mod, seq, device)
        del ref
        rows += table_rows(seq, results, flops, args.layers, device, plan)
        if args.out:  # after each length: a run cut short keeps what it measured
            args.out.write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def table_rows(seq, results, flops, layers, device, plan) -> list[str]:
    base = results.get("keep-all", {})
    recompute = results.get("full recompute", {})
    peak = PEAK_FLOPS.get(device.type)
    planned_bytes = plan.predicted.gpu_bytes["plan"]
    rows = []
    for strategy, r in results.items():
        if "error" in r:
            error = str(r["error"]).replace("|", "/")
            rows.append(f"| {seq} | {strategy} | {error} |" + " |" * (len(COLUMNS) - 3))
            continue
        t = r["seconds"]
        mfu = f"{flops / t / peak:.3f}" if peak else "n/a (CPU)"
        vs_keep = f"{base['seconds'] / t:.3f}" if "seconds" in base else "n/a"
        vs_rec = f"{recompute['seconds'] / t:.3f}" if "seconds" in recompute else "n/a"
        diff = f"{r['diff']:.1e}" if "diff" in r else "n/a"
        a = r.get("allocator")
        counters = (f"{a['planned']} / {a['in_block']} / {a['unplanned']} "
                    f"({a.get('unplanned_bytes', 0) / 2**30:.2f} GiB)") if a else "n/a"
        over = r["pool_peak"] - planned_bytes if "pool_peak" in r else None
        ratio = "n/a"
        if strategy.startswith("memoplan") and isinstance(r.get("alloc"), int):
            ratio = f"{r['alloc'] / planned_bytes:.3f}"
        pin = f"{r['pin_seconds']:.2f}" if "pin_seconds" in r else "n/a"
        cells = [seq, strategy, f"{t / layers:.4f}", vs_keep, mfu, vs_rec, gib(r.get("alloc")),
                 gib(r.get("reserved")), gib(r.get("arena_peak")), gib(r.get("pool_peak")),
                 gib(over), counters, gib(r.get("pinned")), pin, r.get("trace_bytes", "n/a"),
                 diff, ratio]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


if __name__ == "__main__":
    main()
