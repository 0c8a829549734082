"""bf16 with an attention that refuses float32 (CUDA's flash kernel, stood in on a CPU by
``memoplan.testing.flash_attention``): profile, solve and train under a plan with the gradients
of plain bf16 training. Profiling used to shadow-run every op in float32 and died in the op."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from memoplan.hardware import get_hardware
from memoplan.runtime import apply, stats
from memoplan.solve import SolveConfig, solve_plan
from memoplan.testing import attention
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.loader import load_model_file

MODEL = Path(__file__).parent / "models" / "flash_decoder.py"


def test_standin_refuses_float32_like_flash():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
        attention(q, q, q)
    qb = q.bfloat16().requires_grad_()
    out = attention(qb, qb, qb)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert qb.grad is not None and qb.grad.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def flash_plan():
    prof = profile_model(ProfileConfig(model_file=MODEL, seq=128))
    return prof, solve_plan(prof, SolveConfig(seq=8192, hardware=get_hardware("h200"),
                                              time_limit=2.0))


def test_profile_finds_attention_mixing_and_the_rest_token_wise(flash_plan):
    prof, _ = flash_plan
    kinds = {t.kind for t in prof.layer.saved}
    assert {"input", "mixing_output", "other"} <= kinds
    assert any(t.token_wise for t in prof.layer.saved if t.kind == "other")
    mixing = [n for n in prof.layer.nodes if n.cls == "mixing"]
    assert any("flash_attention" in n.target for n in mixing)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_bf16_training_under_a_plan_equals_plain(flash_plan, alpha):
    _, plan = flash_plan
    plan = dataclasses.replace(plan, layers=tuple(dataclasses.replace(l, alpha=alpha)
                                                  for l in plan.layers))
    mf = load_model_file(MODEL)
    model = mf.build_model()
    ref = copy.deepcopy(model)
    apply(model, plan, debug_poison=True)
    for step in range(2):
        for m in (model, ref):
            m.zero_grad()
        tokens = mf.example_inputs(100 + step)
        a, b = mf.loss_fn(model(*tokens)), mf.loss_fn(ref(*tokens))
        a.backward()
        b.backward()
        assert torch.equal(a, b)
        for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
            assert p.grad.dtype == torch.bfloat16
            assert torch.equal(p.grad, r.grad), name
    s = stats(model)
    assert s["layer_calls"] == 2 * len(plan.layers)
    assert (s["recomputed_tokens"] > 0) == (alpha < 1.0)


@pytest.mark.parametrize("mode", ["offload", "recompute", "keep"])
def test_attention_dropout_seeds_are_kept_not_redrawn(monkeypatch, mode):
    """Flash attention with dropout returns a seed and offset that its backward reads to rebuild
    the mask (the stand-in does the same): under a plan they must come back intact (a copy
    overwritten in arena memory, or a seed drawn again by a re-run, gives other gradients).
    With the same seed before each step, the gradients equal plain bf16 training bit for bit."""
    monkeypatch.setenv("MEMOPLAN_FLASH_DROPOUT", "0.25")
    mf = load_model_file(MODEL)
    assert mf.module.DROPOUT == 0.25
    prof = profile_model(ProfileConfig(model_file=MODEL, seq=128))
    seeds = [t for t in prof.layer.saved if t.dtype == "int64"]
    assert len(seeds) == 2 and all(t.kind == "mixing_output" for t in seeds)
    plan = solve_plan(prof, SolveConfig(seq=8192, hardware=get_hardware("h200"), time_limit=2.0))
    n = len(plan.layers)
    plan = dataclasses.replace(plan, layers=tuple(
        dataclasses.replace(l, mode=mode if l.index < n - 1 else "keep", alpha=0.5)
        for l in plan.layers))
    model = mf.build_model()
    ref = copy.deepcopy(model)
    apply(model, plan, debug_poison=True)
    for step in range(2):
        grads = []
        for m in (model, ref):
            m.zero_grad()
            torch.manual_seed(7 + step)
            mf.loss_fn(m(*mf.example_inputs(100 + step))).backward()
            grads.append([p.grad for p in m.parameters()])
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    assert all(p.random for p in model._memoplan_runner.programs.values())
