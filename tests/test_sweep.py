"""``memoplan sweep`` per strategy: plan, keep-all, full recompute and offload-all each get
their fit per length, their longest fitting length, and what limits them; --plot draws it."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES
from memoplan.hardware import get_hardware
from memoplan.ir import Profile
from memoplan.plot import sweep_strategies_figure
from memoplan.sweep import LIMITS, STRATEGIES, longest_fit, run_sweep, strategy_summary

LLAMA7B = EXAMPLES / "profiles" / "llama7b.json"
BASE = ("sweep", LLAMA7B, "--seq", "64K..1M", "--gpus", "8", "--time-limit", "1")


@pytest.fixture(scope="module")
def rows():
    """llama7b on 8 H200s cut to 60 GiB: keep-all never fits, the plan stops at 512K."""
    prof = Profile.from_json(json.loads(LLAMA7B.read_text()))
    hw = get_hardware("h200", gpu_mem_gb=60.0)
    return run_sweep(prof, [2**k for k in range(16, 21)],
                     dict(gpus=8, gpus_per_node=8, hardware=hw, time_limit=1.0))


def test_every_strategy_has_fit_mfu_and_limit_per_length(rows):
    gpu_mem = 60 * 2**30
    for r in rows:
        assert set(r.fits_by) == set(r.limits) == set(STRATEGIES)
        assert set(r.limits.values()) <= set(LIMITS)
        assert r.fits_by["plan"] == r.fits
        for k in ("keep_all", "full_recompute", "offload_all"):
            assert k in r.mfu and k in r.gpu_bytes  # predicted even where the plan misses
            if r.gpu_bytes[k] > gpu_mem:
                assert not r.fits_by[k] and r.limits[k] == "gpu"
            if r.fits_by[k]:
                assert r.gpu_bytes[k] <= gpu_mem
        if not r.fits:
            assert "plan" not in r.mfu and r.limit == "gpu" and r.reason
    assert longest_fit(rows) == 256 * 1024 == longest_fit(rows, "plan")
    assert longest_fit(rows, "keep_all") is None
    summary = strategy_summary(rows)
    assert summary["plan"]["stops_at"] == 512 * 1024 and summary["plan"]["stopped_by"] == "gpu"
    assert summary["keep_all"]["stops_at"] == 64 * 1024
    assert summary["full_recompute"]["longest_fit"] == 256 * 1024


def test_offload_all_stops_at_host_memory_and_the_plan_reports_host():
    """Full H200s: offload-all pins more than a node's host memory at 512K; the plan's alpha is
    held below 1 by host memory at 1M."""
    prof = Profile.from_json(json.loads(LLAMA7B.read_text()))
    rows = run_sweep(prof, [512 * 1024, 2**20], dict(gpus=8, gpus_per_node=8,
                                                     hardware=get_hardware("h200"), time_limit=1.0))
    assert [r.limits["offload_all"] for r in rows] == ["host", "host"]
    assert not any(r.fits_by["offload_all"] for r in rows)
    assert rows[-1].fits and rows[-1].limit == "host" and rows[-1].alpha < 1


def test_cli_prints_per_strategy_longest_fits_and_the_limit_column(cli, tmp_path):
    png = tmp_path / "pics" / "sweep.png"
    r = cli(*BASE, "--gpu-mem-gb", "60", "--plot", png)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "longest sequence that fits:" in out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines()
             if line.startswith("  ") and ":" in line}
    assert "256K" in lines["plan"] and "at 512K GPU memory is the limit" in lines["plan"]
    assert "none" in lines["keep all"]
    assert "256K" in lines["full recompute"] and "offload all" in lines
    assert "limit" in out and "PCIe" in out and "GPU" in out
    assert all(len(line) <= 80 for line in out.splitlines())
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert str(png) in out.replace("\n", "")


def test_cli_json_carries_per_strategy_data(cli):
    r = cli(*BASE, "--gpu-mem-gb", "60", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["longest_fit"] == 256 * 1024
    assert set(data["strategies"]) == set(STRATEGIES)
    for k, info in data["strategies"].items():
        assert len(info["mfu"]) == len(info["fits"]) == len(info["limit"]) == len(data["rows"])
    assert data["strategies"]["keep_all"]["longest_fit"] is None
    assert data["strategies"]["plan"]["limit"][-1] == "gpu"
    assert all(set(row["fits_by"]) == set(STRATEGIES) for row in data["rows"])


def test_figure_marks_where_each_strategy_stops(rows):
    fig = sweep_strategies_figure(rows, gpu_mem_bytes=60 * 2**30)
    mfu_ax = fig.axes[0]
    gids = {line.get_gid() for line in mfu_ax.get_lines()}
    assert {f"mfu:{k}" for k in STRATEGIES} <= gids
    assert {"stop:plan", "stop:keep_all", "stop:full_recompute"} <= gids
    stop = next(line for line in mfu_ax.get_lines() if line.get_gid() == "stop:plan")
    (x,), _ = stop.get_data()
    assert x == 512 * 1024
    texts = [t.get_text() for t in mfu_ax.texts]
    assert "plan: GPU memory" in texts and "PCIe" in texts
