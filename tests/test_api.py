"""The API a user types first (``import memoplan``; ``memoplan.load_plan``;
``memoplan.runtime.apply``), kept light to import, and the profile summary's sizes."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from conftest import EXAMPLES, ROOT
from memoplan.hardware import get_hardware
from memoplan.ir import SizeLaw
from memoplan.jsonio import load_profile, write_json_atomic
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.units import fmt_bytes

LLAMA = EXAMPLES / "llama" / "model.py"


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    """A plan for the example Llama (profiled at 128 tokens, solved for 8K on one GPU), written
    as ``memoplan solve`` writes it."""
    prof = profile_model(ProfileConfig(model_file=LLAMA, seq=128))
    plan = solve_plan(prof, SolveConfig(seq=8192, hardware=get_hardware("h200"), time_limit=2.0))
    return write_json_atomic(tmp_path_factory.mktemp("api") / "plan.json", plan.to_json())


def test_import_memoplan_is_light_and_reaches_the_runtime(plan_file):
    """In a fresh interpreter: ``import memoplan`` loads no torch, python-mip or matplotlib and
    no stage; ``memoplan.load_plan`` reads a plan without torch; ``memoplan.runtime`` is there
    as an attribute after a bare ``import memoplan``."""
    code = f"""
import json, sys
import memoplan
heavy = [m for m in ("torch", "mip", "matplotlib", "memoplan.runtime", "memoplan.trace",
                     "memoplan.solve", "memoplan.emit") if m in sys.modules]
assert not heavy, heavy
assert {{"runtime", "trace", "solve", "emit", "load_plan", "apply"}} <= set(dir(memoplan))
plan = memoplan.load_plan({str(plan_file)!r})
assert "torch" not in sys.modules, "reading a plan imported torch"
assert callable(memoplan.runtime.apply) and memoplan.apply is memoplan.runtime.apply
assert memoplan.runtime.load_plan({str(plan_file)!r}).to_json() == plan.to_json()
from memoplan import trace, solve, emit
assert callable(trace.profile_model) and callable(solve.solve_plan)
try:
    memoplan.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("memoplan.no_such_name did not raise AttributeError")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_two_lines_train_as_plain_training(plan_file):
    """README's training loop: ``memoplan.load_plan`` then ``memoplan.runtime.apply``; one
    training step gives the gradients and parameters of plain training."""
    import memoplan

    spec = importlib.util.spec_from_file_location("api_llama", LLAMA)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build_model()
    ref = copy.deepcopy(model)

    plan = memoplan.load_plan(plan_file)
    model = memoplan.runtime.apply(model, plan)

    inputs = mod.example_inputs(96)
    for m in (model, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        out = m(**inputs) if isinstance(inputs, dict) else m(*inputs)
        loss = mod.loss_fn(out) if hasattr(mod, "loss_fn") else out.float().pow(2).mean()
        loss.backward()
        opt.step()
    assert model._memoplan_runner.calls == len(plan.layers)  # the plan really ran
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)


def test_profile_summary_shows_the_size_at_the_profiled_length(cli, tmp_path):
    """A saved tensor whose size has a quadratic part (attention scores kept for backward):
    the summary's bytes and bytes/token are its size at the profiled length, not the linear
    coefficient of its law, and the law is shown whole; totals add up the same way."""
    from memoplan.report import profile_summary

    prof = load_profile(EXAMPLES / "profiles" / "llama_tiny.json")
    seq = prof.seq_len
    i, t = next((i, t) for i, t in enumerate(prof.layer.saved) if t.kind == "other")
    law = SizeLaw(coeffs=(0.0, t.law.per_token, 16.0))
    saved = list(prof.layer.saved)
    saved[i] = dataclasses.replace(t, law=law, bytes=law.bytes_at(seq))
    prof = dataclasses.replace(prof, layer=dataclasses.replace(prof.layer, saved=tuple(saved)))

    console = Console(file=io.StringIO(), width=120)
    console.print(profile_summary(prof))
    text = console.file.getvalue()
    layer = [s for s in prof.layer.saved if s.kind != "shared"]
    total = sum(s.bytes for s in layer)
    assert total > sum(s.bytes_per_token for s in layer) * seq  # the quadratic part counts
    row = next(line for line in text.splitlines() if "per layer (" in line)
    linear = sum(s.law.per_token for s in layer)
    assert fmt_bytes(total) in row and f"{total / seq:,.0f}" in row
    assert f"{linear:,.0f}·S + 16·S²" in row

    # scripts get the same numbers from --json (the linear coefficients stay as they were)
    path = write_json_atomic(tmp_path / "profile.json", prof.to_json())
    facts = json.loads(cli("show", path, "--json").stdout)
    assert facts["saved_bytes_per_layer"] == total
    assert sum(facts["saved_bytes"].values()) == sum(s.bytes for s in prof.layer.saved)
    assert facts["saved_bytes_per_token_per_layer"] == linear
