"""Benchmark of the solve stage on real layer traces.

For each profile and target length it prints, side by side, the level-1 (forward, backward) and
level-2 (iteration) planned peak (MIP), greedy-by-size, the simulated PyTorch caching allocator's
reserved peak, and the lower bound, with solve times and the stage the offsets come from; then
whole solves of Llama-7B at 1M tokens on 8 GPUs (a DGX H200 node, and the paper's A800 node) and
at 128K on one H200, with their wall time. A case that does not fit gets a row that says why.
The results file is rewritten after every case, so a stopped run leaves what it had.

    python benchmarks/solve_bench.py [--out benchmarks/results/solve.md] [--time-limit 20]

Profiles: examples/profiles/*.json (written by `memoplan profile`, see that folder's README).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memoplan.errors import MemoplanError
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
            f"{lp.caching_reserved_peak / lp.lower_bound:.4f} | {lp.status} | {lp.seconds:.1f} | "
            f"{lp.method} |")
    return rows, wall, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "solve.md")
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--quick", action="store_true", help="tiny profiles only, short limits (CI smoke)")
    args = ap.parse_args()
    header = ("| profile | seq/GPUs hw | level | tensors | MIP MiB | greedy MiB | caching MiB | "
              "bound MiB | MIP/bound | greedy/bound | caching/bound | status | solve s | by |\n"
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    cases = [("llama_tiny", 64 * 1024, 1, "h200"), ("gpt_tiny", 64 * 1024, 1, "h200"),
             ("hf_llama_tiny", 64 * 1024, 1, "h200")]
    if not args.quick:
        cases += [("llama7b", 32 * 1024, 1, "h200"), ("gpt7b", 512 * 1024, 8, "a800")]
    lines = [header]
    done = ["", "Single-length cases above use 4 state bytes/param (bf16 weights + grads). MIP "
            "MiB: the solver's planned peak; by: the stage its offsets come from (greedy-by-size, "
            "a structured start, the order search or CBC; `memoplan show` gives the note).", "",
            "| whole solve | wall s | alpha | arena GiB | forward MIP/bound | "
            "backward MIP/bound | MIP <= greedy | predicted MFU plan / keep-all / recompute |",
            "|---|---:|---:|---:|---:|---:|---|---|"]

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Solve benchmark\n\nCommand: `python benchmarks/solve_bench.py"
                            f"{' --quick' if args.quick else ''}` (2-core CPU, python-mip/CBC, "
                            f"time limit {args.time_limit} s per level).\n\n"
                            + "\n".join(lines + done) + "\n")

    for name, seq, gpus, hw in cases:
        try:
            rows, _, _ = run(name, seq, gpus, hw, 2.0 if args.quick else args.time_limit, 4.0)
        except MemoplanError as e:
            rows = [f"| {name} | {fmt_tokens(seq)}/{gpus} {hw} | does not fit: "
                    f"{str(e).splitlines()[0]} |" + " |" * 10]
        lines += rows
        print("\n".join(rows), flush=True)
        write()
    if not args.quick:
        # one H200 cannot hold Adam states of 7B (100 GiB) beside 128K activations: that case
        # uses bf16 weights and grads only (4 bytes/param), as the runtime benchmark does
        for name, seq, gpus, hw, state in (("llama7b", 1 << 20, 8, "h200", 16.0),
                                           ("llama7b", 1 << 20, 8, "a800", 16.0),
                                           ("llama7b", 128 * 1024, 1, "h200-box", 4.0)):
            case = f"{name} {fmt_tokens(seq)} on {gpus} {hw} ({state:g} B/param)"
            try:
                _, wall, plan = run(name, seq, gpus, hw, args.time_limit, state)
            except MemoplanError as e:
                done.append(f"| {case} | does not fit: {str(e).splitlines()[0]} |" + " |" * 6)
            else:
                lv = plan.levels
                mfu = plan.predicted.mfu
                done.append(
                    f"| {case} | {wall:.1f} | {max(d.alpha for d in plan.layers):.3f} | "
                    f"{plan.arena_bytes / 2**30:.2f} | {lv['forward'].ratio:.4f} | "
                    f"{lv['backward'].ratio:.4f} | "
                    f"{all(l.peak <= l.greedy_peak for l in lv.values())} | "
                    f"{mfu['plan']:.3f} / {mfu['keep_all']:.3f} / {mfu['full_recompute']:.3f} |")
            print(done[-1], flush=True)
            write()
    write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
