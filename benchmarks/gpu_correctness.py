"""Gradients under a plan against plain training, on the device it runs on (GPU check).

For each model, precision and swap fraction: the loss and every parameter gradient of a model
trained under a plan (every layer under it, none kept back; with ``debug_poison``: every dropped
tensor and every released arena block is NaN-filled, so a missing stream wait shows as wrong
gradients) against plain training of a copy. In float32 the largest relative difference must
stay under 1e-5 (TF32 is turned off: with it, recomputed tokens differ by about 1e-3); in
bfloat16 it is printed beside the spread of two plain runs (GPU kernels need not be
deterministic) and must stay under 8 x that spread and 2e-2 (`bad`). The NaN column counts non-finite gradient elements over all steps.
``--planned-allocator`` runs the same in a child process with ``install_allocator()`` first and
also prints the allocator's counters (planned / placed in a phase's block / unplanned /
arena allocations still live at the end).

Models: the examples (``llama``, ``gpt``, ``hf_llama``: their tiny presets, in ``--dtypes``) and
``stack``, the layer stack of ``stack_model.py`` at ``--preset`` x ``--layers``, in its preset's
dtype (7B-shaped bf16 layers with ``--preset 7b``).

    python benchmarks/gpu_correctness.py --device cuda [--planned-allocator] [--out FILE]
    python benchmarks/gpu_correctness.py --device cuda --models stack --preset 7b --layers 2 \\
        --seq 8192 --alphas 0 0.5 1 --planned-allocator --out FILE
    python benchmarks/gpu_correctness.py --device cpu --quick       # smoke (CI)
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._pytree import tree_map_only

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memoplan.runtime as runtime  # noqa: E402
from benchmarks import common  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODELS = ("llama", "gpt", "hf_llama", "stack")


def model_file(name: str) -> Path:
    return common.STACK_FILE if name == "stack" else ROOT / "examples" / name / "model.py"


def set_env(name: str, preset: str, layers: int) -> None:
    """The environment a model file reads at build time: the stack at ``preset`` x ``layers``,
    the examples at their defaults."""
    if name == "stack":
        os.environ["MEMOPLAN_PRESET"], os.environ["MEMOPLAN_LAYERS"] = preset, str(layers)
    else:
        os.environ.pop("MEMOPLAN_PRESET", None)
        os.environ.pop("MEMOPLAN_LAYERS", None)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"check_{name}", model_file(name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def loss_of(mod, model, seq, device):
    inputs = tree_map_only(torch.Tensor, lambda t: t.to(device), mod.example_inputs(seq))
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return mod.loss_fn(out) if hasattr(mod, "loss_fn") else out.float().pow(2).mean()


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check(mod, base, plan, seq: int, device: torch.device, steps: int) -> dict:
    """Largest relative gradient difference (plan vs plain, and plain vs plain), over steps, and
    non-finite gradient elements of the planned model. ``base``: the model, on ``device`` in the
    dtype to check (copied, not changed)."""
    model, plain, twin = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    runtime.apply(model, plan, debug_poison=True)
    worst = spread = loss_diff = 0.0
    nan = 0
    for step in range(steps):
        n = seq - 3 * step  # lengths the split does not divide evenly, too
        grads = []
        for m in (model, plain, twin):
            m.zero_grad(set_to_none=True)
            loss = loss_of(mod, m, n, device)
            loss.backward()
            grads.append(([p.grad for p in m.parameters()], loss.detach()))
        (gm, lm), (gp, lp), (gt, _) = grads
        worst = max(worst, max(rel(a, b) for a, b in zip(gm, gp)))
        spread = max(spread, max(rel(a, b) for a, b in zip(gt, gp)))
        loss_diff = max(loss_diff, abs((lm - lp).item()) / max(abs(lp.item()), 1e-30))
        nan += sum(int((~torch.isfinite(g)).sum()) for g in gm)
    return {"grad_diff": worst, "plain_spread": spread, "loss_diff": loss_diff, "nan": nan,
            "stats": runtime.stats(model)}


def build(mod, dtype: str, device: torch.device):
    return mod.build_model().to(dtype=DTYPES[dtype], device=device)


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 bound is for IEEE float32
    torch.backends.cudnn.allow_tf32 = False
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None,
                    help="default: llama gpt hf_llama (llama gpt with --quick)")
    ap.add_argument("--preset", default="tiny", help="the stack's preset (tiny, 7b)")
    ap.add_argument("--layers", type=int, default=2, help="the stack's layers")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                    help="the examples' dtypes (default: float32 and on a GPU bfloat16; float32 "
                         "with --quick); the stack runs in its preset's")
    ap.add_argument("--alphas", nargs="+", type=float, default=None,
                    help="swap fractions forced on every layer (default 0 0.3 0.5 1; 0.5 with "
                         "--quick)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--profile-seq", type=int, default=128)
    ap.add_argument("--profile", type=Path, default=None,
                    help="the stack's profile: read from this file if it exists, else written")
    ap.add_argument("--host-mem-gb", type=float, default=None,
                    help="host memory the plans may fill, GiB (default: the h200 preset's, or "
                         "0.8 x MemAvailable when that is less)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--planned-allocator", action="store_true")
    ap.add_argument("--child-timeout", type=int, default=120)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("NAME", "DTYPE", "PLAN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        alloc = runtime.install_allocator()
        name, dtype, plan_path = args.child
        device = torch.device("cuda")
        set_env(name, args.preset, args.layers)
        mod = load(name)
        r = check(mod, build(mod, dtype, device), runtime.load_plan(plan_path), args.seq,
                  device, args.steps)
        r["allocator"] = alloc.stats()
        print("CHILD " + json.dumps(r, default=str))
        return
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="memoplan-check-"))
    names = args.models or (["llama", "gpt"] if args.quick else ["llama", "gpt", "hf_llama"])
    alphas = args.alphas or ([0.5] if args.quick else [0.0, 0.3, 0.5, 1.0])
    dtypes = args.dtypes or (["float32"] if args.quick or args.device == "cpu"
                             else ["float32", "bfloat16"])
    device = torch.device(args.device)
    rows = [f"{args.steps} steps at {args.seq} tokens (then {args.seq} - 3 per step) on "
            f"{args.device}; the stack is {args.preset} x {args.layers} layers.", "",
            "| model | dtype | alpha | allocator | max rel grad diff | plain vs plain | "
            "loss diff | NaN | host MiB | recomputed tokens | allocator planned / in block / "
            "unplanned / arena allocations left |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    failed = False
    for name in names:
        if name == "hf_llama" and importlib.util.find_spec("transformers") is None:
            continue
        set_env(name, args.preset, args.layers)
        mod = load(name)
        for dtype in stack_dtype(mod) if name == "stack" else dtypes:
            prof = profile(name, mod, dtype, args)
            base = build(mod, dtype, device)
            for alpha in alphas:
                plan = common.solve(prof, args.seq, args.host_mem_gb, 2.0, alpha=alpha,
                                    keep_last=0)
                plan_path = common.write_plan(plan, tmp / f"{name}-{dtype}-{alpha}.json")
                try:
                    r = check(mod, base, runtime.load_plan(plan_path), args.seq, device,
                              args.steps)
                except Exception as e:  # noqa: BLE001  (a row, and the other cases still run)
                    traceback.print_exc()
                    r = {"error": f"{type(e).__name__}: {e}"[:300].replace("\n", " / ")}
                results = [("caching", r)]
                if args.planned_allocator and device.type == "cuda":
                    results.append(("planned", child(args, name, dtype, plan_path)))
                for kind, res in results:
                    rows.append(row(name, dtype, alpha, kind, res))
                    failed |= bad(res, dtype)
                if args.out:  # after each case: a run cut short keeps what it checked
                    args.out.write_text("\n".join(rows) + "\n")
                gc.collect()  # the planned model (a cycle through its wrapped layers), its slab
            del base
    print("\n".join(rows))
    sys.exit(1 if failed else 0)


def stack_dtype(mod) -> list[str]:
    """The stack is checked in its preset's dtype (tiny: float32, 7b: bfloat16) only: its
    inputs come in that dtype."""
    return [str(mod.llama.config().dtype).removeprefix("torch.")]


def profile(name: str, mod, dtype: str, args):
    """The model's profile in ``dtype`` on the run's device (the stack's through ``--profile``,
    which the other benchmarks may share)."""
    from memoplan.trace import ProfileConfig, profile_model

    if name == "stack":
        return common.stack_profile(args.device, args.profile_seq, args.profile)
    return profile_model(ProfileConfig(model_file=model_file(name), seq=args.profile_seq,
                                       dtype=dtype, device=args.device))


def child(args, name, dtype, plan_path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, dtype, str(plan_path), "--seq",
           str(args.seq), "--steps", str(args.steps), "--preset", args.preset, "--layers",
           str(args.layers)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.child_timeout} s"}
    line = next((l for l in done.stdout.splitlines() if l.startswith("CHILD ")), None)
    if line is None:
        return {"error": (done.stderr or done.stdout).strip()[-300:].replace("\n", " / ")}
    return json.loads(line[len("CHILD "):])


def row(name, dtype, alpha, kind, r) -> str:
    if "error" in r:
        error = str(r["error"]).replace("|", "/")
        return f"| {name} | {dtype} | {alpha} | {kind} | error: {error} |" + " |" * 6
    a = r.get("allocator")
    planned = (f"{a['planned']} / {a['in_block']} / {a['unplanned']} / "
               f"{a['arena_allocations']}" if a else "n/a")
    return (f"| {name} | {dtype} | {alpha} | {kind} | {r['grad_diff']:.1e} | "
            f"{r['plain_spread']:.1e} | {r['loss_diff']:.1e} | {r['nan']} | "
            f"{r['stats']['host_bytes'] / 2**20:.1f} | {r['stats']['recomputed_tokens']} | "
            f"{planned} |")


BF16_FLOOR = 2e-2  # largest relative gradient difference a half-precision run may show


def bad(r, dtype) -> bool:
    """A failed check: an error, a non-finite gradient, or gradients off plain training's. In
    float32 by more than 1e-5; in half precision by more than 8 x the spread of two plain runs
    and `BF16_FLOOR` (recomputing a subset of tokens may block a matmul differently), or a loss
    off by more than 1e-2. Stale but finite data (a copy read before it landed, in buffers the
    caching allocator hands out unpoisoned) shows as a difference of order 1."""
    if "error" in r or r["nan"]:
        return True
    if dtype == "float32":
        return r["grad_diff"] > 1e-5
    return r["grad_diff"] > max(8 * r["plain_spread"], BF16_FLOOR) or r["loss_diff"] > 1e-2


if __name__ == "__main__":
    main()
