"""Benchmark of training strategies on a stack of Llama-shaped layers, side by side in one run.

Strategies: keep-all (plain autograd), full recompute (``torch.utils.checkpoint`` per layer),
``save_on_cpu`` (pinned on a GPU), a naive async offload (every saved tensor >= 1 MiB copied to
host on a side stream, brought back on demand), memoplan with PyTorch's caching allocator, and
(on a GPU) memoplan with its planned allocator, which must be installed before the process's
first CUDA allocation and so runs in a child process of this one. The layers are profiled on the
device they run on and the plan is solved here (greedy addresses where python-mip is missing).

Prints per strategy: seconds per layer (forward + backward, best of the timed steps), the ratio
to keep-all, MFU (GPU; model FLOPs = 3 x forward, from the profile), MFU over full recompute's,
peak allocated and reserved device memory (GPU), pinned host memory, the largest relative
gradient difference against keep-all, and for memoplan the measured peak over the plan's
predicted device bytes.

    python benchmarks/runtime_bench.py --quick                          # CPU smoke (CI)
    python benchmarks/runtime_bench.py --preset 7b --layers 2 --seq 65536 131072 --device cuda \\
        --out benchmarks/results/runtime-h200.md
    python benchmarks/runtime_bench.py --preset 7b --layers 32 --seq 131072 --device cuda \\
        --strategies "full recompute" memoplan "memoplan + planned allocator"

No GPU row has been measured yet (no GPU in the sessions that wrote this); on a CPU the table
shows the schedule's overhead, not its GPU speed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memoplan.runtime as runtime  # noqa: E402
from benchmarks.stack_model import Stack  # noqa: E402  (what is trained, and profiled)

STACK_FILE = ROOT / "benchmarks" / "stack_model.py"

STRATEGIES = ("keep-all", "full recompute", "save_on_cpu", "naive offload", "memoplan",
              "memoplan + planned allocator")
PEAK_FLOPS = {"cuda": 989e12}  # H200 bf16 dense


def load_example(preset: str, layers: int):
    """The llama example with ``layers`` layers of the preset's size (no embedding is used)."""
    os.environ["MEMOPLAN_PRESET"] = preset
    os.environ["MEMOPLAN_LAYERS"] = str(layers)
    path = ROOT / "examples" / "llama" / "model.py"
    spec = importlib.util.spec_from_file_location("bench_llama", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


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
        t.record_stream(stream)
        return ("host", host)

    def unpack(p):
        return p[1].to(device, non_blocking=True) if isinstance(p, tuple) else p

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def make_inputs(mod, seq: int, device: torch.device):
    cfg = mod.config()
    cos, sin = mod.rope_cos_sin(seq, cfg.dim // cfg.n_heads, cfg.rope_theta, device, cfg.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, seq, cfg.dim, dtype=cfg.dtype, device=device, generator=gen)
    return x, cos, sin


def run(stack, inputs, strategy: str, steps: int, device: torch.device) -> dict:
    """Train ``steps`` steps; the first is a warm-up. Times, gradients and memory peaks."""
    x, cos, sin = inputs
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda and strategy != "memoplan + planned allocator":  # the pluggable one keeps no stats
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
        sync()
        times.append(time.perf_counter() - began)
    result = {"seconds": min(times[1:] if len(times) > 1 else times),
              "grads": [p.grad.detach().float().cpu() for p in stack.parameters()]}
    if cuda and strategy != "memoplan + planned allocator":
        result["alloc"] = torch.cuda.max_memory_allocated()
        result["reserved"] = torch.cuda.max_memory_reserved()
    if strategy.startswith("memoplan"):
        result["runtime"] = {k: v for k, v in runtime.stats(stack).items()}
        rt = result["runtime"]
        result["pinned"] = rt["host_slab_bytes"] + rt["host_extra_bytes"] if cuda else None
    return result


def worker(args) -> None:
    """Child process: memoplan with the planned allocator, installed before any CUDA tensor."""
    alloc = runtime.install_allocator()
    device = torch.device("cuda")
    mod, _ = load_example(args.preset, args.layers)
    model = mod.build_model().to(device)
    stack = Stack(model)
    plan = runtime.load_plan(args.worker_plan)
    runtime.apply(stack, plan)
    alloc.reset_peaks()
    result = run(stack, make_inputs(mod, args.seq[0], device), "memoplan + planned allocator",
                 args.steps, device)
    stats = alloc.stats()
    result.update(alloc=stats["pool_peak"], reserved=alloc.reserved_high(), allocator=stats)
    ref = Path(args.worker_plan).with_suffix(".grads.pt")
    if ref.exists():
        result["diff"] = max_rel_diff(result["grads"], torch.load(ref))
    del result["grads"]
    print("WORKER " + json.dumps(result))


def max_rel_diff(grads, ref) -> float:
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
               for a, b in zip(grads, ref))


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
    ap.add_argument("--state-bytes", type=float, default=4.0,
                    help="bytes per parameter of model states the plan assumes (4: bf16 weights "
                         "and gradients, no optimizer)")
    ap.add_argument("--profile-seq", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per MIP")
    ap.add_argument("--child-timeout", type=int, default=900)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 lengths, 2 steps (CI)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    ap.add_argument("--worker-plan", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_plan:
        return worker(args)
    if args.quick:
        args.preset, args.seq, args.steps = "tiny", [256, 512], 2
    device = torch.device(args.device)
    if device.type != "cuda" and "memoplan + planned allocator" in args.strategies:
        args.strategies.remove("memoplan + planned allocator")  # it places CUDA tensors only

    from memoplan.hardware import get_hardware
    from memoplan.solve import SolveConfig, solve_plan
    from memoplan.trace import ProfileConfig, profile_model

    mod, path = load_example(args.preset, args.layers)
    profile_seq = args.profile_seq or (128 if args.preset == "tiny" else 1024)
    # the stack's own file: the plan then budgets what the stack holds outside the arena
    prof = profile_model(ProfileConfig(model_file=STACK_FILE, seq=profile_seq, device=args.device))
    model = mod.build_model().to(device)
    stack = Stack(model)
    tmp = Path(tempfile.mkdtemp(prefix="memoplan-bench-"))
    rows = ["| S | strategy | s/layer | vs keep-all | MFU | vs full recompute | peak alloc GiB | "
            "peak reserved GiB | pinned GiB | max rel grad diff | peak / plan |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for seq in args.seq:
        inputs = make_inputs(mod, seq, device)
        flops = args.layers * 3 * prof.layer.flops_forward.total_at(seq)
        plan = solve_plan(prof, SolveConfig(seq=seq, hardware=get_hardware("h200"),
                                            time_limit=args.time_limit,
                                            state_bytes_per_param=args.state_bytes))
        plan_path = tmp / f"plan-{seq}.json"
        plan_path.write_text(json.dumps(plan.to_json()))
        results: dict[str, dict] = {}
        for strategy in args.strategies:
            if strategy == "memoplan + planned allocator":
                continue  # after the others, in a fresh process
            target = stack
            if strategy == "memoplan":
                target = runtime.apply(Stack(model), plan)  # wraps the layers: runs last here
            try:
                results[strategy] = run(target, inputs, strategy, args.steps, device)
            except torch.cuda.OutOfMemoryError:
                results[strategy] = {"error": "out of memory"}
        if "keep-all" in results and "grads" in results["keep-all"]:
            torch.save(results["keep-all"]["grads"], plan_path.with_suffix(".grads.pt"))
        if "memoplan + planned allocator" in args.strategies:
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results["memoplan + planned allocator"] = in_child(args, seq, plan_path)
            inputs = make_inputs(mod, seq, device)
        rows += table_rows(seq, results, flops, args.layers, device, plan)
        if args.out:  # after each length: a run cut short keeps what it measured
            args.out.write_text("\n".join(rows) + "\n")
        if "memoplan" in args.strategies:  # unwrap for the next length
            for layer in model.layers:
                layer.__dict__.pop("forward", None)
    print("\n".join(rows))


def table_rows(seq, results, flops, layers, device, plan) -> list[str]:
    base = results.get("keep-all", {})
    recompute = results.get("full recompute", {})
    peak = PEAK_FLOPS.get(device.type)
    gib = lambda v: f"{v / 2**30:.2f}" if isinstance(v, (int, float)) and v >= 0 else "n/a"  # noqa: E731
    rows = []
    for strategy, r in results.items():
        if "error" in r:
            rows.append(f"| {seq} | {strategy} | {r['error']} |" + " |" * 8)
            continue
        t = r["seconds"]
        mfu = flops / t / peak if peak else None
        vs_keep = f"{base['seconds'] / t:.3f}" if "seconds" in base else "n/a"
        vs_rec = f"{recompute['seconds'] / t:.3f}" if "seconds" in recompute else "n/a"
        if "diff" in r:
            diff = f"{r['diff']:.1e}"
        elif "grads" in r and "grads" in base:
            diff = f"{max_rel_diff(r['grads'], base['grads']):.1e}"
        else:
            diff = "n/a"
        ratio = "n/a"
        if strategy.startswith("memoplan") and isinstance(r.get("alloc"), int):
            ratio = f"{r['alloc'] / plan.predicted.gpu_bytes['plan']:.3f}"
        rows.append(f"| {seq} | {strategy} | {t / layers:.4f} | {vs_keep} | "
                    f"{f'{mfu:.3f}' if mfu else 'n/a (CPU)'} | {vs_rec} | {gib(r.get('alloc'))} | "
                    f"{gib(r.get('reserved'))} | {gib(r.get('pinned'))} | {diff} | {ratio} |")
    return rows


if __name__ == "__main__":
    main()
