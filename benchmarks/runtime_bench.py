"""Benchmark of training strategies on a stack of Llama-shaped layers, side by side in one run.

Strategies: keep-all (plain autograd), full recompute (``torch.utils.checkpoint`` per layer),
``save_on_cpu`` (pinned on a GPU), a naive async offload (every saved tensor >= 1 MiB copied to
host on a side stream, brought back on demand) and memoplan (profile, solve, apply). Prints
seconds per layer (forward + backward), MFU (GPU only; model FLOPs 3x forward, causal attention
counted as half), peak allocated and reserved device memory (GPU only) and the largest relative
gradient difference against keep-all.

    python benchmarks/runtime_bench.py --quick                         # CPU smoke (CI)
    python benchmarks/runtime_bench.py --preset 7b --layers 2 --seq 65536 --device cuda

The GPU rows of the issue's targets have not been measured yet (no GPU in the session that
wrote this); on a CPU the table shows the schedule's overhead, not its GPU speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memoplan.hardware import get_hardware  # noqa: E402
from memoplan.runtime import apply  # noqa: E402
from memoplan.solve import SolveConfig, solve_plan  # noqa: E402
from memoplan.trace import ProfileConfig, profile_model  # noqa: E402


def load_example(preset: str):
    os.environ["MEMOPLAN_PRESET"] = preset
    path = ROOT / "examples" / "llama" / "model.py"
    spec = importlib.util.spec_from_file_location("bench_llama", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


class Stack(torch.nn.Module):
    """The model's decoder layers alone, fed random hidden states (no embedding or head)."""

    def __init__(self, model: torch.nn.Module, n: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(list(model.layers)[:n])

    def forward(self, x, cos, sin, strategy: str = "keep"):
        for layer in self.layers:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False) if strategy == "recompute" \
                else layer(x, cos, sin)
        return x


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


def run(stack, inputs, strategy, steps, device):
    x, cos, sin = inputs
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        stack.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        sync()
        began = time.perf_counter()
        if strategy == "save_on_cpu":
            ctx = torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
        elif strategy == "naive offload":
            ctx = naive_offload_hooks(device)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            out = stack(xi, cos, sin, "recompute" if strategy == "full recompute" else "keep")
        out.float().pow(2).mean().backward()
        sync()
        times.append(time.perf_counter() - began)
    grads = [p.grad.detach().clone() for p in stack.parameters()]
    mem = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) \
        if device.type == "cuda" else (None, None)
    return min(times[1:] if len(times) > 1 else times), grads, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=[512])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 lengths, 2 steps (CI)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.seq, args.steps = "tiny", [256, 512], 2
    device = torch.device(args.device)
    mod, path = load_example(args.preset)
    prof = profile_model(ProfileConfig(model_file=path, seq=128 if args.preset == "tiny" else 256))
    model = mod.build_model().to(device)
    rows = ["| S | strategy | s/layer | vs keep-all | MFU | peak alloc GiB | peak reserved GiB | "
            "max rel grad diff |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for seq in args.seq:
        stack = Stack(model, args.layers).to(device)
        cfg = model.cfg
        dtype = next(model.parameters()).dtype
        cos, sin = mod.rope_cos_sin(seq, cfg.dim // cfg.n_heads, cfg.rope_theta, device, dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, seq, cfg.dim, dtype=dtype, device=device, generator=gen)
        inputs = (x, cos, sin)
        flops = args.layers * 3 * (prof.layer.flops_forward.total_at(seq))
        results = {}
        for strategy in ("keep-all", "full recompute", "save_on_cpu", "naive offload", "memoplan"):
            target = stack
            if strategy == "memoplan":
                plan = solve_plan(dataclass_layers(prof, args.layers),
                                  SolveConfig(seq=seq, hardware=get_hardware("h200"), time_limit=5,
                                              state_bytes_per_param=4))
                target = apply(copy.deepcopy(stack), plan)
            results[strategy] = run(target, inputs, strategy, args.steps, device)
        base_t, base_g, _ = results["keep-all"]
        for strategy, (t, grads, (alloc, reserved)) in results.items():
            diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                       for a, b in zip(grads, base_g))
            mfu = f"{flops / t / 989e12:.3f}" if device.type == "cuda" else "n/a (CPU)"
            gib = (lambda v: f"{v / 2**30:.2f}" if v is not None else "n/a")
            rows.append(f"| {seq} | {strategy} | {t / args.layers:.4f} | {t / base_t:.2f} | {mfu} | "
                        f"{gib(alloc)} | {gib(reserved)} | {diff:.1e} |")
    print("\n".join(rows))
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")


def dataclass_layers(prof, n: int):
    import dataclasses

    return dataclasses.replace(prof, model=dataclasses.replace(prof.model, num_layers=n))


if __name__ == "__main__":
    main()
