"""Pictures, ``memoplan plot``/``show``/``sweep``: figure content checked through its data
(rectangles, lines, bars), the commands through their files, tables and JSON."""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
from matplotlib.colors import to_hex

from conftest import EXAMPLES
from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.ir import Plan, Profile
from memoplan.plot import (KIND_COLORS, MIB, caching_figure, level_blocks, level_figure, load_snapshot,
                           phase_labels, snapshot_figure, timeline_figure)
from memoplan.solve import SolveConfig, solve_plan
from memoplan.solve.caching_sim import simulate_caching_allocator
from memoplan.solve.dsa import Block
from memoplan.solve.levels import blocks_to_requests
from memoplan.sweep import parse_seq_list
from memoplan.timeline import schedule

TINY = EXAMPLES / "profiles" / "llama_tiny.json"
PLOTS = {"forward", "backward", "iteration", "caching_forward", "caching_backward",
         "caching_iteration", "timeline"}
SEG_BASE = 0x7F00_0000_0000  # where the synthetic snapshot's first segment lives


@pytest.fixture(scope="session")
def tiny_profile() -> Profile:
    return Profile.from_json(json.loads(TINY.read_text()))


@pytest.fixture(scope="session")
def plan(tiny_profile) -> Plan:
    """128K tokens on one GPU: three offloaded layers and a kept one."""
    cfg = SolveConfig(seq=128 * 1024, hardware=get_hardware("h200"), time_limit=2.0)
    return solve_plan(tiny_profile, cfg)


@pytest.fixture(scope="session")
def slow_plan(tiny_profile) -> Plan:
    """A forced alpha of 1 over a 1 GB/s link: copies outlast compute, so the timeline stalls."""
    cfg = SolveConfig(seq=32 * 1024, hardware=get_hardware("h200", pcie_gbps=1.0), alpha=1.0,
                      time_limit=1.0)
    return solve_plan(tiny_profile, cfg)


@pytest.fixture(scope="session")
def plan_file(plan, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    path.write_text(json.dumps(plan.to_json()))
    return path


def _events() -> list[dict]:
    """A small trace: two segments, five allocations (one reused address, one never freed)."""
    a, b = SEG_BASE, SEG_BASE + 20 * MIB
    return [
        {"action": "segment_alloc", "addr": a, "size": 20 * MIB},
        {"action": "alloc", "addr": a, "size": 4 * MIB},                  # 1: ends at 6
        {"action": "alloc", "addr": a + 4 * MIB, "size": 8 * MIB},        # 2: ends at 4
        {"action": "free_requested", "addr": a + 4 * MIB, "size": 8 * MIB},
        {"action": "free_completed", "addr": a + 4 * MIB, "size": 8 * MIB},
        {"action": "free_requested", "addr": a, "size": 4 * MIB},
        {"action": "free_completed", "addr": a, "size": 4 * MIB},
        {"action": "segment_alloc", "addr": b, "size": 40 * MIB},
        {"action": "alloc", "addr": b, "size": 30 * MIB},                 # 8: ends at 10
        {"action": "free_requested", "addr": b, "size": 30 * MIB},
        {"action": "free_completed", "addr": b, "size": 30 * MIB},
        {"action": "alloc", "addr": b, "size": 10 * MIB},                 # 11: live to the end
        {"action": "alloc", "addr": a, "size": 2 * MIB},                  # 12: live to the end
    ]


SNAPSHOT_ALLOCS = {  # (address above the lowest segment, size, first event, end event)
    (0, 4 * MIB, 1, 6), (4 * MIB, 8 * MIB, 2, 4), (20 * MIB, 30 * MIB, 8, 10),
    (20 * MIB, 10 * MIB, 11, 13), (0, 2 * MIB, 12, 13)}


@pytest.fixture
def snapshot_file(tmp_path) -> Path:
    data = {"segments": [{"device": 0, "address": SEG_BASE, "total_size": 20 * MIB, "blocks": []},
                         {"device": 0, "address": SEG_BASE + 20 * MIB, "total_size": 40 * MIB,
                          "blocks": []}],
            "device_traces": [_events()]}
    path = tmp_path / "snapshot.pickle"
    path.write_bytes(pickle.dumps(data))
    return path


def _blocks(ax) -> list:
    return [p for p in ax.patches if str(p.get_gid()).startswith("block:")]


def _line(ax, gid: str):
    [line] = [line for line in ax.get_lines() if line.get_gid() == gid]
    return line


# ---- level plots -----------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["forward", "backward", "iteration"])
def test_level_plot_draws_every_tensor_where_the_plan_puts_it(plan, level):
    lp = plan.levels[level]
    ax = level_figure(lp, title=level).axes[0]
    rects = _blocks(ax)
    grown = [p for p in ax.patches if str(p.get_gid()).startswith("grow:")]
    assert len(ax.patches) == len(rects) + len(grown) and len(rects) == len(lp.offsets) > 0
    # a growing block's later part, drawn right above it, or right below where it grows down
    assert len(grown) == len(lp.grows)
    assert level != "iteration" or lp.grows_down  # every second offloaded layer's
    for g in grown:
        tid = g.get_gid().removeprefix("grow:")
        grow, grow_at = lp.grows[tid]
        assert (g.get_x(), g.get_width()) == (grow_at, lp.lifetimes[tid][1] - grow_at)
        below = tid in lp.grows_down
        assert g.get_y() == pytest.approx((lp.offsets[tid] + (0 if below else lp.sizes[tid]))
                                          / MIB)
        assert g.get_height() == pytest.approx(grow / MIB)
    for r in rects:
        tid = r.get_gid().removeprefix("block:")
        start, end = lp.lifetimes[tid]
        assert (r.get_x(), r.get_width()) == (start, end - start)
        above = lp.grows[tid][0] if tid in lp.grows_down else 0  # its first part on top
        assert r.get_y() == pytest.approx((lp.offsets[tid] + above) / MIB)
        assert r.get_height() == pytest.approx(lp.sizes[tid] / MIB)
        assert to_hex(r.get_facecolor()) == KIND_COLORS[lp.kinds[tid]]
    peak = _line(ax, "peak").get_ydata()[0]
    assert peak == pytest.approx(lp.peak / MIB)
    assert _line(ax, "lower_bound").get_ydata()[0] == pytest.approx(lp.lower_bound / MIB)
    assert peak <= ax.get_ylim()[1] <= 1.2 * peak
    # the live-bytes curve reaches exactly the solver's lower bound (largest live total)
    assert max(_line(ax, "live").get_ydata()) == pytest.approx(lp.lower_bound / MIB)
    assert max(r.get_y() + r.get_height() for r in rects + grown) == pytest.approx(lp.peak / MIB)


def test_level1_kinds_and_level2_phase_ticks(plan):
    assert set(plan.levels["forward"].kinds.values()) >= {"transient", "output"}
    assert "grad" in plan.levels["backward"].kinds.values()
    n = len(plan.layers)
    ax = level_figure(plan.levels["iteration"], title="it", labels=phase_labels(n)).axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["embed", "F0", "F1", "F2", "F3", "head", "R3", "B3", "R2", "B2", "R1", "B1",
                      "R0", "B0"]
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert set(plan.levels["iteration"].kinds.values()) <= legend
    assert {"input", "rounding", "prefetch", "recompute", "grad"} <= legend
    assert "head" not in legend  # logits and loss live outside the arena (plan.pool_bytes)


# ---- caching comparison ----------------------------------------------------------------------

@pytest.mark.parametrize("level", ["forward", "iteration"])
def test_caching_panel_replays_the_caching_allocator(plan, level):
    lp = plan.levels[level]
    blocks = level_blocks(lp)  # growing blocks whole from their start, as a caching allocator holds them
    sim = simulate_caching_allocator(blocks_to_requests(blocks))
    assert sim.reserved_peak == lp.caching_reserved_peak  # the solver recorded the same baseline
    fig = caching_figure(lp, title=level)
    left, right = fig.axes[:2]
    assert left.get_ylim() == right.get_ylim()
    assert _line(left, "peak").get_ydata()[0] == pytest.approx(lp.peak / MIB)
    assert _line(right, "reserved_peak").get_ydata()[0] == pytest.approx(sim.reserved_peak / MIB)
    assert right.get_ylim()[1] >= sim.reserved_peak / MIB
    rects = _blocks(right)
    assert len(rects) == len(_blocks(left)) == len(lp.offsets)
    for r in rects:  # (a block growing down: its first part on top of what it will hold)
        tid = r.get_gid().removeprefix("block:")
        above = lp.grows[tid][0] if tid in lp.grows_down else 0
        assert r.get_y() == pytest.approx((sim.offsets[tid] + above) / MIB)
    segments = [p for p in right.patches if p.get_gid() == "segment"]
    drawn = [v for s in sorted((s.get_y(), s.get_height()) for s in segments) for v in s]
    simulated = [v for a, z in sorted(sim.segments) for v in (a / MIB, z / MIB)]
    assert drawn == pytest.approx(simulated)
    for r in rects:  # every block lies inside a segment, from the segment's creation on
        assert any(s.get_y() <= r.get_y() + 1e-9 and r.get_y() + r.get_height()
                   <= s.get_y() + s.get_height() + 1e-9 and s.get_x() <= r.get_x()
                   for s in segments)
    assert str(round(sim.reserved_peak / MIB, 1)) in right.get_title().replace(",", "")


def test_caching_allocator_reserves_more_than_the_iteration_plan(plan):
    lp = plan.levels["iteration"]
    right = caching_figure(lp, title="iteration").axes[1]
    assert _line(right, "reserved_peak").get_ydata()[0] > _line(right, "plan_peak").get_ydata()[0]


# ---- timeline --------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["plan", "slow_plan"])
def test_timeline_draws_each_scheduled_bar(which, request):
    p = request.getfixturevalue(which)
    bars = schedule(p.layers, forward_s=p.predicted.forward_s, backward_s=p.predicted.backward_s,
                    token_wise_forward_s=p.predicted.token_wise_forward_s,
                    pcie_bytes_per_s=p.predicted.pcie_bytes_per_s)
    ax = timeline_figure(p).axes[0]
    assert len(ax.patches) == len(bars)
    rows = {t.get_text(): round(y) for t, y in zip(ax.get_yticklabels(), ax.get_yticks())}
    for stream, label in (("compute", "compute"), ("d2h", "D2H (offload)"),
                          ("h2d", "H2D (prefetch)")):
        drawn = [r for r in ax.patches if round(r.get_y() + r.get_height() / 2) == rows[label]]
        assert len(drawn) == sum(b.stream == stream for b in bars) > 0
    stalls = [r for r in ax.patches if ":stall:" in r.get_gid()]
    assert len(stalls) == sum(b.kind == "stall" for b in bars)
    assert all(to_hex(r.get_facecolor()) == "#d62728" for r in stalls)
    assert ax.get_xlim()[1] >= max(b.end for b in bars) * 1e3
    if which == "slow_plan":
        assert stalls


# ---- snapshot --------------------------------------------------------------------------------

def test_snapshot_overlay_draws_one_rectangle_per_alloc(plan, snapshot_file):
    snap = load_snapshot(snapshot_file)
    assert set(snap.allocs) == SNAPSHOT_ALLOCS and snap.n_events == 13
    assert snap.peak_allocated == 30 * MIB  # the 30 MiB block alone, events 8-9
    fig = snapshot_figure(snap, plan)
    left, right = fig.axes[:2]
    [allocs] = [c for c in left.collections if c.get_gid() == "allocs"]
    paths = allocs.get_paths()
    assert len(paths) == sum(e["action"] == "alloc" for e in _events())
    drawn = {(round(p.vertices[:, 1].min() * MIB), round((p.vertices[:, 1].max()
              - p.vertices[:, 1].min()) * MIB), p.vertices[:, 0].min(), p.vertices[:, 0].max())
             for p in paths}
    assert drawn == SNAPSHOT_ALLOCS
    for ax in (left, right):
        assert _line(ax, "arena").get_ydata()[0] == pytest.approx(plan.arena_bytes / MIB)
    assert len(_blocks(right)) == len(plan.levels["iteration"].offsets)
    assert left.get_ylim() == right.get_ylim()
    assert len([p for p in left.patches if p.get_gid() == "segment"]) == 2


@pytest.mark.parametrize("payload, message", [
    (b"this is not a pickle", "not a readable PyTorch memory snapshot"),
    (pickle.dumps([1, 2, 3]), "not a PyTorch memory snapshot"),
    (pickle.dumps({"segments": []}), "not a PyTorch memory snapshot"),
    (pickle.dumps(OrderedDict(a=1)), "collections.OrderedDict"),
    (pickle.dumps({"segments": [], "device_traces": [[]]}), "no allocation trace"),
    (pickle.dumps({"segments": [], "device_traces": [[{"action": "alloc", "addr": -1}]]}),
     "non-negative integers"),
])
def test_bad_snapshots_are_refused_with_a_reason(tmp_path, payload, message):
    path = tmp_path / "bad.pickle"
    path.write_bytes(payload)
    with pytest.raises(MemoplanError, match=message):
        load_snapshot(path)


# ---- commands --------------------------------------------------------------------------------

def test_plot_command_writes_every_picture(cli, plan_file, snapshot_file, tmp_path):
    out = tmp_path / "pics"
    r = cli("plot", plan_file, "-o", out, "--snapshot", snapshot_file)
    assert r.exit_code == 0, r.output
    written = {p.stem for p in out.glob("*.png")}
    assert written == PLOTS | {"snapshot"}
    for path in out.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert str(path) in r.output


@pytest.mark.parametrize("args, message", [
    (("plot", "{missing}"), "No plan file"),
    (("plot", "{corrupt}"), "not a valid JSON plan"),
    (("plot", "{profile}"), "not a memoplan plan"),
    (("plot", "{plan}", "--snapshot", "{corrupt}"), "not a readable PyTorch memory snapshot"),
    (("plot", "{plan}", "--snapshot", "{missing}"), "No snapshot file"),
    (("show", "{missing}"), "No profile or plan file"),
    (("show", "{corrupt}"), "not a valid JSON profile or plan"),
    (("show", "{foreign}"), "not a memoplan profile or plan"),
    (("sweep", "{plan}", "--seq", "32K"), "not a memoplan profile"),
    (("sweep", "{profile}", "--seq", "64K..32K"), "runs backwards"),
])
def test_bad_inputs_exit_2_with_a_message(cli, plan_file, tmp_path, args, message):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema": "memoplan.plan/2", "lev')
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"schema": "someone.else/3"}')
    files = {"missing": tmp_path / "nope.json", "corrupt": corrupt, "foreign": foreign,
             "profile": TINY, "plan": plan_file}
    r = cli(*(a.format(**files) for a in args), "-q" if args[0] != "show" else "--json")
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_show_prints_a_profile_and_a_plan(cli, plan_file, plan, tiny_profile):
    r = cli("show", TINY)
    assert r.exit_code == 0 and "LlamaBlock x 4" in r.output and "skeletal tensors" in r.output
    r = cli("show", plan_file)
    assert r.exit_code == 0 and "address plan" in r.output and "full recompute" in r.output
    facts = json.loads(cli("show", TINY, "--json").stdout)
    assert facts["kind"] == "profile" and facts["num_layers"] == tiny_profile.model.num_layers
    assert facts["saved_bytes_per_token_per_layer"] == pytest.approx(
        sum(t.bytes_per_token for t in tiny_profile.layer.saved if t.kind != "shared"))
    facts = json.loads(cli("show", plan_file, "--json").stdout)
    assert facts["kind"] == "plan" and facts["arena_bytes"] == plan.arena_bytes
    assert facts["modes"] == {"offload": 3, "keep": 1}
    assert facts["levels"]["iteration"]["caching_reserved_peak"] == \
        plan.levels["iteration"].caching_reserved_peak


def test_sweep_reports_rows_and_the_longest_fitting_length(cli, tmp_path):
    base = ("sweep", TINY, "--seq", "32K..64K", "--gpus", "8", "--time-limit", "1",
            "--keep-last", "1")  # fixed: the default adapts what it keeps to the GPU
    r = cli(*base, "--json")
    assert r.exit_code == 0, r.output
    both = json.loads(r.stdout)
    assert [(row["seq"], row["tokens_per_gpu"], row["fits"]) for row in both["rows"]] == [
        (32768, 4096, True), (65536, 8192, True)]
    assert both["longest_fit"] == 65536
    small, large = (row["gpu_total_bytes"] for row in both["rows"])
    assert small < large
    for row in both["rows"]:
        assert row["mfu"]["full_recompute"] < row["mfu"]["keep_all"]
        assert row["arena_bytes"] < row["gpu_total_bytes"] == row["gpu_bytes"]["plan"]
    between = (small + large) / 2 / 2**30  # a GPU that holds the 32K plan but not the 64K one
    r = cli(*base, "--gpu-mem-gb", f"{between:.6f}", "-o", tmp_path / "sw")
    assert r.exit_code == 0, r.output
    assert "longest sequence that fits:" in r.output
    plan_line = next(line for line in r.output.splitlines() if line.startswith("  plan:"))
    assert "32K" in plan_line and "at 64K GPU memory is the limit" in plan_line
    assert "does not fit" in r.output and "32K" in r.output and "64K" in r.output
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_seq_lists():
    assert parse_seq_list("32K..1M") == [2**k for k in range(15, 21)]
    assert parse_seq_list("48K..256K") == [48 * 1024, 96 * 1024, 192 * 1024, 256 * 1024]
    assert parse_seq_list("64K,32K") == [32768, 65536]
    assert parse_seq_list("128K") == [131072]
    with pytest.raises(MemoplanError, match="runs backwards"):
        parse_seq_list("1M..32K")
