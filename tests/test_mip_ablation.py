"""The MIP ablation benchmark runs (``--quick``: two small configurations) and its figures are
consistent: every planner stays at or above the bounds, the solver at or below its start,
greedy and CBC alone, its stages only go down, and a level whose start meets the bound says
that no search and no MIP ran."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import ROOT, markdown_table


def _rows(text: str) -> list[dict[str, str]]:
    return markdown_table(text, "profile")


def _mib(cell: str) -> float | None:
    return None if cell == "-" else float(cell.replace(",", ""))


def test_quick_ablation_is_consistent(tmp_path):
    out = tmp_path / "ablation.md"
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "benchmarks/mip_ablation.py", "--quick", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.perf_counter() - began < 30  # about 7 s here
    rows = _rows(done.stdout)
    assert [(r["profile"], r["seq/GPUs"], r["level"]) for r in rows] == [
        (p, "32K/1", level) for p in ("llama_tiny", "llama7b_stack2")
        for level in ("forward", "backward", "iteration")]
    eps = 0.051  # figures are rounded to 0.1 MiB
    for r in rows:
        bound, holes, solver = _mib(r["bound"]), _mib(r["hole bound"]), _mib(r["solver"])
        start, search, cbc = _mib(r["start"]), _mib(r["search"]), _mib(r["CBC"])
        assert bound <= holes + eps and holes <= solver + eps, r
        for other in ("greedy", "best-fit", "caching", "CBC alone"):
            assert holes <= _mib(r[other]) + eps, (other, r)
        assert solver <= min(start, _mib(r["greedy"]), _mib(r["CBC alone"])) + eps, r
        stages = [v for v in (start, search, cbc) if v is not None]
        assert stages == sorted(stages, reverse=True) and stages[-1] == solver, r
        if solver <= holes + eps:
            assert r["status"] == "optimal", r
        elif r["status"] == "optimal":  # above the bound only CBC can prove it
            assert cbc is not None, r
        if start <= holes + eps:  # the start met the bound: nothing else ran
            assert search is None and cbc is None and r["status"] == "optimal", r
        for column in ("solver s", "CBC alone s", "greedy s", "best-fit s", "caching s"):
            assert 0 <= float(r[column]) < 30, (column, r)
    levels = {(r["profile"], r["level"]): r for r in rows}
    # level 1 of these layers: greedy-by-size is optimal, so the MIP is skipped
    for key, r in levels.items():
        if key[1] != "iteration":
            assert r["status"] == "optimal" and r["search"] == "-" and r["CBC"] == "-", r
    # level 2 with split tensors: the structured start and the search beat greedy-by-size
    for name in ("llama_tiny", "llama7b_stack2"):
        r = levels[(name, "iteration")]
        assert _mib(r["solver"]) < _mib(r["greedy"]), r
    written = out.read_text()
    assert _rows(written) == rows
    assert "Command: `python benchmarks/mip_ablation.py --quick`, run 20" in written
    assert "Greedy-by-size meets the bound" in written
