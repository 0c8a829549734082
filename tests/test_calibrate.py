"""`memoplan calibrate` on a CPU: the hardware file's figures, their sources, a direct timing
to compare with, bad input, and `solve --hw` reading the file."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import EXAMPLES
from memoplan.calibrate import FIELDS, Bench, peak_tflops


@pytest.fixture(scope="module")
def hw_file(tmp_path_factory) -> Path:
    """One quick calibration of this CPU through the CLI, shared by the tests below."""
    from memoplan.cli.app import app

    path = tmp_path_factory.mktemp("calibrate") / "hw.json"
    r = CliRunner().invoke(app, ["calibrate", "--quick", "-o", str(path)])
    assert r.exit_code == 0, r.output
    assert f"wrote {path}" in r.output.replace("\n", "")
    return path


def test_cpu_file_has_every_figure_positive_with_a_source(hw_file):
    hw = json.loads(hw_file.read_text())
    assert list(hw) == [*FIELDS, "sources"]
    assert isinstance(hw["name"], str) and hw["name"].startswith("cpu")
    assert hw["gpus_per_node"] == 1 and isinstance(hw["gpus_per_node"], int)
    for field in FIELDS[1:]:
        value = hw[field]
        assert isinstance(value, (int, float)) and math.isfinite(value), field
        if field == "pin_s_per_gib":  # a CPU pins nothing, and its source says so
            assert value == 0 and "no pinning" in hw["sources"][field]
        else:
            assert value > 0, field
    assert set(hw["sources"]) == set(FIELDS)
    assert all(isinstance(s, str) and s for s in hw["sources"].values())
    for field in ("matmul_tflops", "attn_fwd_tflops", "attn_bwd_tflops", "hbm_gbps",
                  "d2h_gbps", "h2d_gbps", "duplex_gbps"):
        assert hw["sources"][field].startswith("measured by memoplan calibrate on cpu"), field
    assert "float32" in hw["sources"]["matmul_tflops"]
    assert "memcpy" in hw["sources"]["d2h_gbps"]
    assert hw["peak_tflops"] == hw["matmul_tflops"]  # a CPU's peak is its measured rate


def test_matmul_figure_matches_a_direct_timing(hw_file):
    hw = json.loads(hw_file.read_text())
    n = 1024
    x, w = torch.randn(n, n), torch.randn(n, n)
    x @ w
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t0)
    direct = 2 * n**3 / statistics.median(times) / 1e12
    assert direct / 3 < hw["matmul_tflops"] < direct * 3, (hw["matmul_tflops"], direct)


def test_peak_is_the_datasheet_figure_for_known_gpus():
    matmul = (500.0, "measured")

    def peak(name: str) -> float:
        b = Bench(device=torch.device("cuda"), name=name, quick=True, date="today")
        return peak_tflops(b, matmul)[0]

    assert peak("NVIDIA H200") == 989.0
    assert peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA A800-SXM4-80GB") == peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("Tesla V100-SXM2-32GB") == 500.0  # no datasheet entry: the measured rate


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_exits_2(cli, tmp_path):
    r = cli("calibrate", "--device", "cuda", "--quick", "-o", tmp_path / "hw.json")
    assert r.exit_code == 2
    assert "needs a CUDA GPU" in r.output and "--device cpu" in r.output
    assert not (tmp_path / "hw.json").exists()


def test_bad_device_and_unwritable_output_exit_2_before_measuring(cli, tmp_path):
    r = cli("calibrate", "--device", "tpu", "-o", tmp_path / "hw.json")
    assert r.exit_code == 2 and "--device must be cpu, cuda or cuda:N" in r.output
    (tmp_path / "file").write_text("")
    t0 = time.perf_counter()
    r = cli("calibrate", "-o", tmp_path / "file" / "hw.json")  # full run, were it to start
    assert r.exit_code == 2 and "Cannot write the hardware file" in r.output
    r = cli("calibrate", "-o", tmp_path)  # a folder
    assert r.exit_code == 2 and "Cannot write the hardware file" in r.output
    assert time.perf_counter() - t0 < 5


def test_solve_takes_the_calibrated_file(cli, hw_file, tmp_path):
    import memoplan.hardware

    if not hasattr(memoplan.hardware, "load_hardware"):
        pytest.skip("memoplan.hardware.load_hardware (solve --hw FILE.json) does not exist yet")
    assert set(FIELDS[1:]) == set(getattr(memoplan.hardware, "FIGURES", FIELDS[1:]))
    memoplan.hardware.load_hardware(hw_file)
    out = tmp_path / "plan.json"
    r = cli("solve", EXAMPLES / "profiles" / "llama_tiny.json", "--hw", hw_file, "--seq", "8K",
            "--time-limit", "5", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert out.is_file()
