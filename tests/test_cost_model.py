"""The cost model against the H200 measurements, and the hardware descriptions it reads.

The measured seconds are inputs (hard-coded below from ``../shared/reference/h200-baselines.md``,
script ``h200_baselines.py`` beside it); the test checks the model. ``tests/models/h200_stack.py``
is that script's stack (2 Llama-7B-shape layers, bf16, causal flash attention), profiled here on
a CPU. Two figures of the ``h200`` presets are fitted to the table, the attention forward and
backward rates, from the 32K and 128K rows only; 16K and 64K are predictions. Everything else
(matmul rate, HBM bandwidth) is the page's own measurement.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import ROOT
from memoplan.hardware import FIGURES, PRESETS, Hardware, get_hardware, load_hardware
from memoplan.ir import Profile
from memoplan.solve import SolveConfig
from memoplan.solve.swap import decide_swaps, layer_times, predict
from memoplan.trace import ProfileConfig, profile_model

STACK = ROOT / "tests" / "models" / "h200_stack.py"
LLAMA7B = ROOT / "examples" / "profiles" / "llama7b.json"

# ../shared/reference/h200-baselines.md, "Per-layer results": seconds per layer (forward +
# backward) of the 2-layer stack, and its MFU (3 x forward FLOPs, causal attention 2 S^2 h,
# recomputation not counted, over 989 TFLOP/s).
MEASURED = {  # S: (keep all s, full recompute s, keep-all MFU)
    16 * 1024: (0.059, 0.076, 0.451),
    32 * 1024: (0.170, 0.215, 0.393),
    64 * 1024: (0.534, 0.676, 0.350),
    128 * 1024: (1.848, 2.363, 0.318),
}
FITTED_AT = (32 * 1024, 128 * 1024)
TOLERANCE = 0.10  # the target: within 10% at every length


@pytest.fixture(scope="module")
def stack() -> Profile:
    return profile_model(ProfileConfig(model_file=STACK, seq=64))


def _seconds(p: Profile, seq: int, hw: Hardware) -> tuple[float, float]:
    """Predicted (keep-all, full recompute) seconds per layer: forward + backward, and one
    forward more."""
    t = layer_times(p, SolveConfig(seq=seq, hardware=hw))
    return t.forward + t.backward, 2 * t.forward + t.backward


def _fit_attention(p: Profile, lengths) -> tuple[float, float]:
    """Attention forward and backward TFLOP/s that best fit the measured keep-all and full
    recompute rows at ``lengths`` (least squares on relative errors): the model is linear in
    1/rate, so the rest of it is the time at an infinite rate, and each rate's coefficient the
    attention time at 1 TFLOP/s."""
    base = PRESETS["h200-box"]
    rows, rhs = [], []
    for seq in lengths:
        keep, full, _ = MEASURED[seq]
        rest = _seconds(p, seq, dataclasses.replace(base, attn_fwd_tflops=1e30,
                                                    attn_bwd_tflops=1e30))
        unit = layer_times(p, SolveConfig(seq=seq, hardware=dataclasses.replace(
            base, attn_fwd_tflops=1.0, attn_bwd_tflops=1.0))).parts
        a_f, a_b = unit["forward"]["attention"], unit["backward"]["attention"]
        rows += [[a_f / keep, a_b / keep], [2 * a_f / full, a_b / full]]
        rhs += [(keep - rest[0]) / keep, (full - rest[1]) / full]
    x, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return 1 / x[0], 1 / x[1]


def test_the_profile_gives_per_class_work(stack):
    """Matmul FLOPs (token-wise), attention FLOPs (causal: 2 S^2 h forward, twice that
    backward) and memory-bound bytes, all from the stack's own graph."""
    h = 4096
    f, b = stack.layer.flops_forward, stack.layer.flops_backward
    assert f.token_wise_law.per_token == pytest.approx(2 * (4 * h * h + 3 * h * 11008))
    assert f.mixing_law.coeffs[2] == pytest.approx(2 * h) and b.mixing_law.coeffs[2] == 4 * h
    t = layer_times(stack, SolveConfig(seq=64 * 1024, hardware=get_hardware("h200-box")))
    for phase in ("forward", "backward"):
        assert set(t.parts[phase]) == {"matmul", "attention", "memory"}
        assert all(v > 0 for v in t.parts[phase].values())
    # memory-bound ops: fp32 RMSNorm, SiLU, residual adds: a few hundred KB per token forward
    assert 200e3 < t.parts["forward"]["memory"] * 4200e9 / (64 * 1024) < 1e6


def test_attention_rates_of_the_preset_are_the_fit_at_32k_and_128k(stack):
    fwd, bwd = _fit_attention(stack, FITTED_AT)
    for name in ("h200", "h200-box", "h100"):
        hw = PRESETS[name]
        assert hw.attn_fwd_tflops == pytest.approx(fwd, abs=1.0)
        assert hw.attn_bwd_tflops == pytest.approx(bwd, abs=1.0)
        assert "fitted" in hw.sources["attn_fwd_tflops"]


@pytest.mark.parametrize("seq", sorted(MEASURED))
def test_seconds_per_layer_within_10_percent_of_the_h200_table(stack, seq):
    keep, full, mfu = MEASURED[seq]
    hw = get_hardware("h200-box")
    got_keep, got_full = _seconds(stack, seq, hw)
    fitted = "fitted" if seq in FITTED_AT else "predicted"
    print(f"{seq // 1024}K ({fitted}): keep-all {got_keep:.3f} s vs {keep} "
          f"({got_keep / keep - 1:+.1%}), full recompute {got_full:.3f} s vs {full} "
          f"({got_full / full - 1:+.1%})")
    assert got_keep == pytest.approx(keep, rel=TOLERANCE)
    assert got_full == pytest.approx(full, rel=TOLERANCE)
    # MFU counts the same FLOPs as the page, so it is as close
    t = layer_times(stack, SolveConfig(seq=seq, hardware=hw))
    got_mfu = (t.flops_forward + t.flops_backward) / got_keep / (hw.peak_tflops * 1e12)
    assert got_mfu == pytest.approx(mfu, rel=TOLERANCE)


def test_predicted_mfu_falls_with_length_as_measured(stack):
    """No longer one efficiency at every length: keep-all MFU falls from 16K to 128K, as
    measured (0.451 -> 0.318), and every baseline uses the same layer times."""
    hw = get_hardware("h200-box")
    mfu = {}
    for seq in MEASURED:
        cfg = SolveConfig(seq=seq, hardware=hw, keep_last=1)
        d = decide_swaps(stack, cfg)
        pred = predict(d, cfg)
        mfu[seq] = pred.mfu["keep_all"]
        t = d.times
        assert pred.iteration_s["keep_all"] == pytest.approx(2 * (t.forward + t.backward))
        assert pred.iteration_s["full_recompute"] == pytest.approx(
            2 * (2 * t.forward + t.backward))
        assert pred.iteration_s["plan"] >= pred.iteration_s["keep_all"] - 1e-12
        assert pred.iteration_s["offload_all"] >= pred.iteration_s["keep_all"] - 1e-12
    lengths = sorted(mfu)
    assert all(mfu[a] > mfu[b] for a, b in zip(lengths, lengths[1:]))
    assert mfu[lengths[0]] / mfu[lengths[-1]] == pytest.approx(0.451 / 0.318, rel=0.1)


# ---- hardware presets and files --------------------------------------------------------------

def test_every_preset_figure_says_where_it_comes_from():
    assert {"h200", "h200-box", "h100", "a800", "a100"} <= set(PRESETS)
    for name, hw in PRESETS.items():
        for f in FIGURES:
            assert getattr(hw, f) > 0, (name, f)
            assert len(hw.sources.get(f, "")) > 10, (name, f)
    node, box = PRESETS["h200"], PRESETS["h200-box"]
    assert (node.gpus_per_node, box.gpus_per_node) == (8, 1)
    assert node.host_mem_gb > 1500 and box.host_mem_gb == 110
    assert PRESETS["a800"].host_mem_gb == node.host_mem_gb and PRESETS["a800"].peak_tflops == 312
    assert node.pcie_gbps == node.d2h_gbps == 55.3  # the older name


def test_hardware_file_round_trip_and_solve_takes_it(cli, tmp_path):
    hw = get_hardware("h200", host_mem_gb=500)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(hw.to_json()))
    back = load_hardware(path)
    assert back == hw and back.sources == hw.sources
    assert "overridden with --host-mem-gb" in back.sources["host_mem_gb"]
    out = tmp_path / "plan.json"
    r = cli("solve", ROOT / "examples" / "profiles" / "llama_tiny.json", "--hw", path,
            "--seq", "8K", "--time-limit", "2", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["config"]["hardware"]["host_mem_gb"] == 500
    r = cli("show", out)
    assert r.exit_code == 0 and "matmul 773" in r.output and "500 GiB host" in r.output


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("hbm_gbps"), "'hbm_gbps' is missing"),
    (lambda d: d.update(attn_bwd_tflops=0), "'attn_bwd_tflops' must be a positive number"),
    (lambda d: d.update(d2h_gbps=-1), "'d2h_gbps' must be a positive number"),
    (lambda d: d.update(matmul_tflops="fast"), "'matmul_tflops' must be a positive number"),
    (lambda d: d.update(gpus_per_node=1.5), "'gpus_per_node' must be a whole number"),
    (lambda d: d.pop("name"), "'name' is missing"),
])
def test_bad_hardware_files_exit_2_naming_the_field(cli, tmp_path, edit, field):
    data = PRESETS["h200"].to_json()
    edit(data)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(data))
    r = cli("solve", ROOT / "examples" / "profiles" / "llama_tiny.json", "--hw", path,
            "-o", tmp_path / "plan.json")
    assert r.exit_code == 2, r.output
    assert field in r.output and "Traceback" not in r.output


def test_zero_pinning_cost_is_accepted(tmp_path):
    """A CPU calibration pins nothing: 0 s/GiB is a valid figure (every other must be > 0)."""
    data = PRESETS["h200"].to_json() | {"pin_s_per_gib": 0}
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(data))
    assert load_hardware(path).pin_s_per_gib == 0


def test_1m_tokens_on_an_8_gpu_h200_node_offloads_every_layer():
    """With the node's 2 TB of host memory (1800 GiB for activations), the 32-layer 7B model at
    1M tokens on 8 GPUs no longer falls back to checkpointing (25 of 31 layers did with the
    single box's 110 GiB)."""
    p = Profile.from_json(json.loads(LLAMA7B.read_text()))
    cfg = SolveConfig(seq=1 << 20, gpus=8, hardware=get_hardware("h200"))
    d = decide_swaps(p, cfg)
    assert d.fallback is None
    assert {l.mode for l in d.layers} == {"offload", "keep"}
    small = decide_swaps(p, dataclasses.replace(cfg, hardware=get_hardware("h200",
                                                                           host_mem_gb=110)))
    assert sum(l.mode == "recompute" for l in small.layers) > 20
