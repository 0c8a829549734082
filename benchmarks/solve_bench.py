"""Benchmark of the solve stage on real layer traces.

For each profile and target length it prints, side by side, the level-1 (forward, backward) and
level-2 (iteration) planned peak (MIP), greedy-by-size, the simulated PyTorch caching allocator's
reserved peak, and the lower bound, with solve times; then the two configurations of issue 3's
done-when (Llama-7B at 1M tokens on 8 A800s, at 128K on one H200) with their wall time.

    python benchmarks/solve_bench.py [--out benchmarks/results/solve.md] [--time-limit 20]

Profiles: examples/profiles/*.json (written by `memoplan profile`, see that folder's README).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memoplan.hardware import get_hardware
from memoplan.ir import Profile
from memoplan.solve import SolveConfig, solve_plan
from memoplan.units import fmt_tokens

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def load(name: str) -> Profile:
    return Profile.from_json(json.loads((ROOT / "examples" / "profiles" / f"{name}.json").read_text()))


def run(name: str, seq: int, gpus: int, hw: str, time_limit: float,
        state_bytes: float = 16.0) -> tuple[list[str], float, object]:
    cfg = SolveConfig(seq=seq, gpus=gpus, hardware=get_hardware(hw), time_limit=time_limit,
                      state_bytes_per_param=state_bytes)
    began = time.perf_counter()
    plan = solve_plan(load(name), cfg)
    wall = time.perf_counter() - began
    rows = []
    for level, lp in plan.levels.items():
        rows.append(
            f"| {name} | {fmt_tokens(seq)}/{gpus} {hw} | {level} | {len(lp.offsets)} | "
            f"{lp.peak / MiB:,.1f} | {lp.greedy_peak / MiB:,.1f} | {lp.caching_reserved_peak / MiB:,.1f} | "
            f"{lp.lower_bound / MiB:,.1f} | {lp.ratio:.4f} | {lp.greedy_peak / lp.lower_bound:.4f} | "
            f"{lp.caching_reserved_peak / lp.lower_bound:.4f} | {lp.status} | {lp.seconds:.1f} |")
    return rows, wall, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "solve.md")
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--quick", action="store_true", help="tiny profiles only, short limits (CI smoke)")
    args = ap.parse_args()
    header = ("| profile | seq/GPUs hw | level | tensors | MIP MiB | greedy MiB | caching MiB | "
              "bound MiB | MIP/bound | greedy/bound | caching/bound | status | solve s |\n"
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    cases = [("llama_tiny", 64 * 1024, 1, "h200"), ("gpt_tiny", 64 * 1024, 1, "h200"),
             ("hf_llama_tiny", 64 * 1024, 1, "h200")]
    if not args.quick:
        cases += [("llama7b", 32 * 1024, 1, "h200"), ("gpt7b", 512 * 1024, 8, "a800")]
    lines = [header]
    for name, seq, gpus, hw in cases:
        rows, _, _ = run(name, seq, gpus, hw, 2.0 if args.quick else args.time_limit, 4.0)
        lines += rows
        print("\n".join(rows), flush=True)
    done = ["", "Single-length cases above use 4 state bytes/param (bf16 weights + grads).", "",
            "| done-when case | wall s (whole solve) | alpha | arena GiB | forward MIP/bound | "
                "backward MIP/bound | MIP <= greedy | predicted MFU plan / keep-all / recompute |",
            "|---|---:|---:|---:|---:|---:|---|---|"]
    if not args.quick:
        # one H200 cannot hold Adam states of 7B (100 GiB) beside 128K activations: that case
        # uses bf16 weights and grads only (4 bytes/param), as the runtime benchmark does
        for name, seq, gpus, hw, state in (("llama7b", 1 << 20, 8, "a800", 16.0),
                                           ("llama7b", 128 * 1024, 1, "h200", 4.0)):
            _, wall, plan = run(name, seq, gpus, hw, args.time_limit, state)
            lv = plan.levels
            mfu = plan.predicted.mfu
            done.append(
                f"| {name} {fmt_tokens(seq)} on {gpus} {hw} ({state:g} B/param) | {wall:.1f} | {plan.layers[0].alpha:.3f} | "
                f"{plan.arena_bytes / 2**30:.2f} | {lv['forward'].ratio:.4f} | {lv['backward'].ratio:.4f} | "
                f"{all(l.peak <= l.greedy_peak for l in lv.values())} | "
                f"{mfu['plan']:.3f} / {mfu['keep_all']:.3f} / {mfu['full_recompute']:.3f} |")
            print(done[-1], flush=True)
    text = "\n".join(lines + done) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Solve benchmark\n\nCommand: `python benchmarks/solve_bench.py"
                        f"{' --quick' if args.quick else ''}` (2-core CPU, python-mip/CBC, time "
                        f"limit {args.time_limit} s per MIP).\n\n{text}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
