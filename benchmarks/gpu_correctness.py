"""Gradients under a plan against plain training, on the device it runs on (GPU check).

For each example model, swap fraction and precision: the loss and every parameter gradient of
a model trained under a plan (with ``debug_poison``: every dropped tensor and every released
arena block is NaN-filled, so a missing stream wait shows as wrong gradients) against plain
training of a copy. In float32 the largest relative difference must stay under 1e-5; in
bfloat16 it is printed beside the spread of two plain runs (GPU kernels need not be
deterministic). ``--planned-allocator`` runs the same in a child process with
``install_allocator()`` first and also prints the allocator's counters.

    python benchmarks/gpu_correctness.py --device cuda [--planned-allocator] [--out FILE]
    python benchmarks/gpu_correctness.py --device cpu --quick       # smoke (CI)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._pytree import tree_map_only

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memoplan.runtime as runtime  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load(name: str):
    os.environ.pop("MEMOPLAN_LAYERS", None)
    spec = importlib.util.spec_from_file_location(f"check_{name}", ROOT / "examples" / name /
                                                  "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def loss_of(mod, model, seq, device):
    inputs = tree_map_only(torch.Tensor, lambda t: t.to(device), mod.example_inputs(seq))
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return mod.loss_fn(out) if hasattr(mod, "loss_fn") else out.float().pow(2).mean()


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check(mod, plan, dtype, seq: int, device: torch.device, steps: int) -> dict:
    """Largest relative gradient difference (plan vs plain, and plain vs plain), over steps."""
    base = mod.build_model().to(dtype=dtype, device=device)
    model, plain, twin = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    runtime.apply(model, plan, debug_poison=True)
    worst = spread = loss_diff = 0.0
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
        nan = any(not torch.isfinite(g).all() for g in gm)
    return {"grad_diff": worst, "plain_spread": spread, "loss_diff": loss_diff, "nan": nan,
            "stats": runtime.stats(model)}


def plan_for(name: str, dtype: str, alpha: float, seq: int, device: str, tmp: Path) -> Path:
    from memoplan.hardware import get_hardware
    from memoplan.solve import SolveConfig, solve_plan
    from memoplan.trace import ProfileConfig, profile_model

    prof = profile_model(ProfileConfig(model_file=ROOT / "examples" / name / "model.py", seq=128,
                                       dtype=dtype, device=device))
    plan = solve_plan(prof, SolveConfig(seq=seq, hardware=get_hardware("h200"), time_limit=2.0,
                                        alpha=alpha))
    path = tmp / f"{name}-{dtype}-{alpha}.json"
    path.write_text(json.dumps(plan.to_json()))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--planned-allocator", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=3, metavar=("NAME", "DTYPE", "PLAN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        alloc = runtime.install_allocator()
        name, dtype, plan_path = args.child
        r = check(load(name), runtime.load_plan(plan_path), DTYPES[dtype], args.seq,
                  torch.device("cuda"), args.steps)
        r["allocator"] = alloc.stats()
        print("CHILD " + json.dumps(r, default=str))
        return
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="memoplan-check-"))
    names = ["llama", "gpt"] if args.quick else ["llama", "gpt", "hf_llama"]
    alphas = [0.5] if args.quick else [0.0, 0.3, 0.5, 1.0]
    dtypes = ["float32"] if args.quick or args.device == "cpu" else ["float32", "bfloat16"]
    device = torch.device(args.device)
    rows = ["| model | dtype | alpha | allocator | max rel grad diff | plain vs plain | "
            "loss diff | NaN | host MiB | recomputed tokens | allocator planned / in block / "
            "unplanned / arena allocations left |",
            "|---|---|---:|---|---:|---:|---:|---|---:|---:|---|"]
    failed = False
    for name in names:
        if name == "hf_llama" and importlib.util.find_spec("transformers") is None:
            continue
        mod = load(name)
        for dtype in dtypes:
            for alpha in alphas:
                plan_path = plan_for(name, dtype, alpha, args.seq, args.device, tmp)
                r = check(mod, runtime.load_plan(plan_path), DTYPES[dtype], args.seq, device,
                          args.steps)
                results = [("caching", r)]
                if args.planned_allocator and device.type == "cuda":
                    results.append(("planned", child(args, name, dtype, plan_path)))
                for kind, res in results:
                    rows.append(row(name, dtype, alpha, kind, res))
                    failed |= bad(res, dtype)
                if args.out:  # after each case: a run cut short keeps what it checked
                    args.out.write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    sys.exit(1 if failed else 0)


CHILD_TIMEOUT_S = 120


def child(args, name, dtype, plan_path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, dtype, str(plan_path), "--seq",
           str(args.seq), "--steps", str(args.steps)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    line = next((l for l in done.stdout.splitlines() if l.startswith("CHILD ")), None)
    if line is None:
        return {"error": (done.stderr or done.stdout).strip()[-300:]}
    return json.loads(line[len("CHILD "):])


def row(name, dtype, alpha, kind, r) -> str:
    if "error" in r:
        return f"| {name} | {dtype} | {alpha} | {kind} | error: {r['error']} |" + " |" * 6
    a = r.get("allocator")
    planned = (f"{a['planned']} / {a['in_block']} / {a['unplanned']} / "
               f"{a['arena_allocations']}" if a else "n/a")
    return (f"| {name} | {dtype} | {alpha} | {kind} | {r['grad_diff']:.1e} | "
            f"{r['plain_spread']:.1e} | {r['loss_diff']:.1e} | {r['nan']} | "
            f"{r['stats']['host_bytes'] / 2**20:.1f} | {r['stats']['recomputed_tokens']} | "
            f"{planned} |")


def bad(r, dtype) -> bool:
    if "error" in r or r["nan"]:
        return True
    return dtype == "float32" and r["grad_diff"] > 1e-5


if __name__ == "__main__":
    main()
