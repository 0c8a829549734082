"""The benchmark scripts run (CPU smoke, tiny preset, so they cannot rot) and print the tables
they promise, with the columns and numbers the GPU session will read; the phase-timing parser
reads a made-up GPU trace right; gpu_checks.sh runs its steps and marks one that runs out of
time."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import markdown_table as _table


def _run(*args: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "still referenced" not in done.stderr  # runtime_bench freed memoplan's runtime
    return done.stdout



@pytest.fixture(autouse=True)
def _example_size_stays_here(monkeypatch):
    """The benchmarks choose the example's size through MEMOPLAN_PRESET and MEMOPLAN_LAYERS in
    this process; put them back after each test, so later tests build the example as it is."""
    for key in ("MEMOPLAN_PRESET", "MEMOPLAN_LAYERS"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)

def test_runtime_benchmark_smoke(tmp_path):
    out = _run("benchmarks/runtime_bench.py", "--quick", "--out", str(tmp_path / "rt.md"))
    rows = _table(out, "S")
    assert {r["S"] for r in rows} == {"256", "512"}
    assert {r["strategy"] for r in rows} == {"keep-all", "full recompute", "save_on_cpu",
                                             "naive offload", "memoplan"}
    for r in rows:
        assert float(r["s/layer"]) > 0, r
        assert float(r["max rel grad diff"]) < 1e-5, r  # every strategy computes keep-all's grads
        for gpu_only in ("peak alloc GiB", "arena peak GiB", "pool over plan GiB", "pinned GiB",
                         "pin s", "planned / in block / unplanned"):
            assert r[gpu_only] == "n/a", (gpu_only, r)
        # the runtime's programs keep no real tensor (traced on fake ones)
        assert r["trace bytes"] == ("0" if r["strategy"] == "memoplan" else "n/a"), r
    written = (tmp_path / "rt.md").read_text()
    assert _table(written, "S") == rows
    assert "GiB of host memory" in written.splitlines()[0]


def test_solve_benchmark_smoke(tmp_path):
    out = _run("benchmarks/solve_bench.py", "--quick", "--out", str(tmp_path / "solve.md"))
    rows = [line for line in out.splitlines() if line.startswith("| ") and "tiny" in line]
    assert len(rows) == 9  # three tiny profiles x three levels
    for r in rows:
        cells = [c.strip() for c in r.split("|")]
        mip, greedy, bound = (float(cells[i].replace(",", "")) for i in (5, 6, 8))
        assert bound <= mip <= greedy


def test_gpu_correctness_script_smoke_on_cpu(tmp_path):
    """An example and the layer stack (what the GPU check runs at 7B), alpha 0 and 1."""
    out = _run("benchmarks/gpu_correctness.py", "--device", "cpu", "--models", "gpt", "stack",
               "--alphas", "0", "1", "--seq", "192", "--profile", str(tmp_path / "p.json"),
               "--out", str(tmp_path / "c.md"))
    rows = _table(out, "model")
    assert [(r["model"], r["alpha"]) for r in rows] == [
        ("gpt", "0.0"), ("gpt", "1.0"), ("stack", "0.0"), ("stack", "1.0")]
    for r in rows:
        assert float(r["max rel grad diff"]) < 1e-5 and r["NaN"] == "0", r
        assert r["allocator"] == "caching" and float(r["host MiB"]) > 0, r
        assert (int(r["recomputed tokens"]) > 0) == (r["alpha"] == "0.0"), r
    assert (tmp_path / "p.json").exists()  # the stack's profile, for the next script to share
    assert _table((tmp_path / "c.md").read_text(), "model") == rows


def test_gpu_correctness_fails_wrong_half_precision_gradients():
    """The 7B stack on the GPU runs in bf16 only: a stale prefetch (finite, wrong gradients, in
    buffers the caching allocator does not poison) must fail the check, not print a row."""
    spec = importlib.util.spec_from_file_location("gpu_correctness",
                                                  ROOT / "benchmarks" / "gpu_correctness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ok = {"grad_diff": 4e-3, "plain_spread": 2e-3, "loss_diff": 1e-4, "nan": 0}
    assert not mod.bad(ok, "bfloat16")
    assert mod.bad({**ok, "grad_diff": 0.5}, "bfloat16")      # stale data
    assert mod.bad({**ok, "loss_diff": 0.1}, "bfloat16")
    assert mod.bad({**ok, "nan": 3}, "bfloat16")
    assert not mod.bad({**ok, "grad_diff": 5e-6}, "float32")
    assert mod.bad({**ok, "grad_diff": 4e-3}, "float32")


def test_phase_timing_smoke_on_cpu(tmp_path):
    out = _run("benchmarks/phase_timing.py", "--device", "cpu", "--seq", "256", "--alpha", "0.5",
               "--time-limit", "2", "--trace", str(tmp_path / "t.json"),
               "--out", str(tmp_path / "p.md"))
    phases = {r["phase"]: r for r in _table(out, "phase")}
    names = [f"memoplan:{k}[{i}]" for k in ("forward", "recompute", "backward") for i in (0, 1)]
    assert set(phases) == set(names) | {"memoplan:prefetch[0]"}
    for r in phases.values():
        assert float(r["CPU ms"]) > 0, r
        for gpu_only in ("GPU ms", "kernel ms", "idle ms", "copy GB/s", "host ahead ms"):
            assert r[gpu_only] == "n/a", (gpu_only, r)
    step = {r["measure"]: r["value"] for r in _table(out, "measure")}
    assert float(step["step ms (wall, under the profiler)"]) > 0
    assert step["D2H GB/s (sum bytes / sum copy time)"] == "n/a"
    assert step["cudaHostRegister s/GiB"] == "n/a"
    recompute = dict(p.split(": ") for p in step["recompute ms per layer (CPU)"].split(", "))
    assert float(recompute["0"]) > 0  # layer 0 offloads half its tokens, recomputes the rest
    assert step["plan: modes / alphas"].startswith("offload 0.50")
    assert float(step["host slab MiB"]) > 0
    assert (tmp_path / "p.md").read_text() == out.rstrip("\n") + "\n"
    assert (tmp_path / "t.json").stat().st_size > 0


def _script(name: str):
    """A benchmark script as a module (``benchmarks/NAME.py``)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_runtime_benchmark_planned_allocator_row(monkeypatch):
    """The planned allocator's row (a GPU child) reads memory_stats() and the allocator's
    counters: here a CPU run with stand-ins for both."""
    import torch

    rb = _script("runtime_bench")
    common = rb.common
    mod = common.load_example("tiny", 2)
    plan = common.solve(common.stack_profile("cpu", 128), 256, None, 2.0,
                        state_bytes_per_param=4.0)
    stack = rb.runtime.apply(rb.Stack(rb.Stack(mod.build_model())), plan)
    gib = 2**30
    memory = {"arena": {"allocated_peak": gib}, "pool": {"allocated_peak": 3 * gib},
              "total": {"allocated_peak": 2 * gib, "reserved_peak": 4 * gib}}
    counters = {"planned": 5, "in_block": 6, "unplanned": 7, "unplanned_bytes": 3 << 29}
    stats = rb.runtime.stats
    monkeypatch.setattr(rb.runtime, "memory_stats", lambda: memory)
    monkeypatch.setattr(rb.runtime, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(rb.runtime, "stats", lambda m: {**stats(m), "allocator": counters})
    cpu = torch.device("cpu")
    r = rb.run(stack, common.make_inputs(mod, 256, cpu), "memoplan + planned allocator", 2, cpu,
               planned=True)
    rows = rb.table_rows(256, {"memoplan + planned allocator": r}, 1.0, 2, cpu, plan)
    text = "| " + " | ".join(rb.COLUMNS) + " |\n|---|\n" + "\n".join(rows)
    (row,) = _table(text, "S")
    planned = plan.predicted.gpu_bytes["plan"]
    assert (row["peak alloc GiB"], row["peak reserved GiB"]) == ("2.00", "4.00")
    assert (row["arena peak GiB"], row["pool peak GiB"]) == ("1.00", "3.00")
    assert row["pool over plan GiB"] == f"{(3 * gib - planned) / gib:.2f}"
    assert row["peak / plan"] == f"{2 * gib / planned:.3f}"
    assert row["planned / in block / unplanned"] == "5 / 6 / 7 (1.50 GiB)"
    assert row["trace bytes"] == "0"


def _gpu_trace() -> list[dict]:
    """A step of two layers as Kineto writes it (times in us): CPU ranges on the main and the
    autograd thread, launch calls with correlation ids, kernels on stream 7, a device-to-host
    copy launched in forward[0] and a host-to-device one in prefetch[0], and the
    gpu_user_annotation ranges of each phase on each stream it used."""
    cpu = lambda name, tid, ts, dur: {"ph": "X", "cat": "user_annotation",  # noqa: E731
                                      "name": f"memoplan:{name}", "pid": 100, "tid": tid,
                                      "ts": ts, "dur": dur}
    events = [cpu("forward[0]", 1, 0, 50), cpu("forward[1]", 1, 50, 50),
              cpu("prefetch[0]", 2, 280, 5), cpu("recompute[1]", 2, 290, 5),
              cpu("backward[1]", 2, 300, 40), cpu("recompute[0]", 2, 350, 30),
              cpu("backward[0]", 2, 380, 40)]
    ops = [  # (correlation, launch thread, launch ts, cat, name, stream, ts, dur, bytes)
        (1, 1, 10, "kernel", "k1", 7, 100, 100, None),
        (2, 1, 20, "gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 20, 200, 100, 10**6),
        (3, 1, 60, "kernel", "k2", 7, 200, 100, None),
        (4, 2, 282, "gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 21, 310, 200, 4 * 10**6),
        (5, 2, 302, "kernel", "k3", 7, 320, 100, None),
        (6, 2, 352, "kernel", "k4", 7, 515, 50, None),
        (7, 2, 382, "kernel", "k5", 7, 565, 20, None),
        (8, 2, 385, "kernel", "k6", 7, 600, 30, None)]
    phase_of = {1: "forward[0]", 2: "forward[0]", 3: "forward[1]", 4: "prefetch[0]",
                5: "backward[1]", 6: "recompute[0]", 7: "backward[0]", 8: "backward[0]"}
    spans: dict[tuple, list] = {}
    for corr, tid, launch, cat, name, stream, ts, dur, nbytes in ops:
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 100,
                       "tid": tid, "ts": launch, "dur": 2, "args": {"correlation": corr}})
        args = {"device": 0, "stream": stream, "correlation": corr}
        if nbytes:
            args.update({"bytes": nbytes, "memory bandwidth (GB/s)": nbytes / dur / 1e3})
        events.append({"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts,
                       "dur": dur, "args": args})
        span = spans.setdefault((phase_of[corr], stream), [ts, ts + dur])
        span[1] = max(span[1], ts + dur)
    for (phase, stream), (start, end) in spans.items():
        events.append({"ph": "X", "cat": "gpu_user_annotation", "name": f"memoplan:{phase}",
                       "pid": 0, "tid": stream, "ts": start, "dur": end - start})
    return events


@pytest.mark.parametrize("keep", ["both", "annotations", "correlations"])
def test_phase_timing_reads_a_gpu_trace(keep):
    pt = _script("phase_timing")
    events = _gpu_trace()
    if keep == "annotations":
        events = [e for e in events if e["cat"] != "cuda_runtime"]
    elif keep == "correlations":
        events = [e for e in events if e["cat"] != "gpu_user_annotation"]
    res = pt.analyse(events)
    approx = lambda v: pytest.approx(v, abs=1e-9)  # noqa: E731
    assert res["gpu"]
    assert res["step"]["D2H"] == {"bytes": 10**6, "gbps": approx(10.0)}  # 1 MB in 100 us
    assert res["step"]["H2D"] == {"bytes": 4 * 10**6, "gbps": approx(20.0)}
    p = res["phases"]
    fwd = p["memoplan:forward[0]"]
    assert (fwd["cpu_ms"], fwd["gpu_ms"], fwd["kernel_ms"]) == (approx(0.05), approx(0.1),
                                                                 approx(0.1))
    assert fwd["copy_bytes"] == 10**6 and fwd["ahead_ms"] == approx(0.1) and fwd["idle_ms"] == 0
    # backward[1] waits 20 us after forward[1]'s last kernel; no copy ended in that gap
    assert p["memoplan:backward[1]"]["idle_ms"] == approx(0.02)
    assert p["memoplan:backward[1]"]["idle_copy_ms"] == 0
    # recompute[0] starts 95 us after backward[1] ended, 5 us after prefetch[0]'s copy ended
    rec = p["memoplan:recompute[0]"]
    assert (rec["idle_ms"], rec["idle_copy_ms"]) == (approx(0.095), approx(0.095))
    assert rec["kernel_ms"] == approx(0.05) and rec["ahead_ms"] == approx(0.165)
    # backward[0]: two kernels 15 us apart
    bwd = p["memoplan:backward[0]"]
    assert (bwd["gpu_ms"], bwd["kernel_ms"], bwd["idle_ms"]) == (approx(0.065), approx(0.05),
                                                                  approx(0.015))
    pre = p["memoplan:prefetch[0]"]
    assert pre["gpu_ms"] is None and pre["copy_bytes"] == 4 * 10**6
    assert pre["ahead_ms"] == approx(0.03)
    assert p["memoplan:recompute[1]"]["gpu_ms"] is None  # a kept layer recomputes nothing
    info = {"caption": "c", "step_ms": 1.0, "pin_seconds": 2.0, "slab_bytes": 4 * 2**30,
            "pinned": True, "modes": "offload 1.00, keep 0.00", "predicted_step_ms": 1.0,
            "predicted_layer": "1 / 2 / 3"}
    step = {r["measure"]: r["value"] for r in _table(pt.render(res, info), "measure")}
    assert step["cudaHostRegister s/GiB"] == "0.500"
    assert step["compute idle in recompute + backward ms"] == "0.13"  # 20 + 95 + 15 us
    assert float(step["of which in gaps where a copy ended ms"]) == pytest.approx(0.095, abs=0.006)
    assert step["recompute ms per layer (GPU kernels)"] == "0: 0.05, 1: 0.00"


def test_gpu_checks_script_on_cpu(tmp_path):
    """The GPU session's one script, its steps at the tiny preset on a CPU: every table lands
    in $OUT, and a step that runs out of time leaves a row saying so."""
    res, out = tmp_path / "res", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "MEMOPLAN_CHECKS_CPU": "1", "RES": str(res), "OUT": str(out),
           "T_MEMORY": "1"}
    done = subprocess.run(["bash", "benchmarks/gpu_checks.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("gpu-machine.txt", "gpu-grads-tiny.md", "gpu-phases-tiny.md",
                 "gpu-phases-tiny.trace.json.gz", "gpu-steps.md", "gpu-log.txt"):
        assert (out / name).exists(), name
    assert len(_table((out / "gpu-grads-tiny.md").read_text(), "model")) == 3
    assert _table((out / "gpu-phases-tiny.md").read_text(), "phase")
    steps = {r["step"]: r for r in _table((out / "gpu-steps.md").read_text(), "step")}
    assert [r["exit"] for r in steps.values()] == ["0", "0", "0", "124"]
    assert (out / "gpu-runtime-tiny.md").read_text() == \
        "| timed out after 1 s: the rows above are what it measured |\n"
