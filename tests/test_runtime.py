"""The runtime on a CPU: loss and every gradient equal plain training, for the example models,
many swap fractions, lengths (also ones the split does not divide), modes, several iterations,
gradient accumulation and autocast; and plans that do not match the model are refused."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json

import pytest
import torch

from conftest import EXAMPLES
from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.runtime import apply, load_plan, stats
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model

MODELS = ["llama", "gpt", "hf_llama"]


def _module(name: str):
    path = EXAMPLES / name / "model.py"
    spec = importlib.util.spec_from_file_location(f"rt_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def plans():
    """A solved plan per example model (profiled at 128 tokens, solved for 8K on one GPU)."""
    out = {}
    for name in MODELS:
        if name == "hf_llama" and importlib.util.find_spec("transformers") is None:
            continue
        prof = profile_model(ProfileConfig(model_file=EXAMPLES / name / "model.py", seq=128))
        cfg = SolveConfig(seq=8192, hardware=get_hardware("h200"), time_limit=2.0)
        out[name] = solve_plan(prof, cfg)
    return out


def _with(plan, *, alpha: float | None = None, mode: str | None = None):
    layers = tuple(dataclasses.replace(l, **({"alpha": alpha} if alpha is not None else {}),
                                       **({"mode": mode} if mode is not None else {}))
                   for l in plan.layers)
    return dataclasses.replace(plan, layers=layers)


def _loss(mod, model, seq_len):
    inputs = mod.example_inputs(seq_len)
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return mod.loss_fn(out) if hasattr(mod, "loss_fn") else out.float().pow(2).mean()


def _assert_same(model, ref, rtol=1e-6):
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=1e-9, msg=name)


def _steps_equal(mod, model, ref, lengths, atol_of_largest: float | None = None):
    """A step at each length: the same loss, and gradients within rtol 1e-6 (atol 1e-9, or
    `atol_of_largest` times each gradient's largest entry)."""
    for seq_len in lengths:
        for m in (model, ref):
            m.zero_grad()
        a, b = _loss(mod, model, seq_len), _loss(mod, ref, seq_len)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        if atol_of_largest is None:
            _assert_same(model, ref)
            continue
        for (pname, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            atol = atol_of_largest * q.grad.abs().max().item()
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=atol, msg=pname)


def _pair(name, plans, **plan_kw):
    mod = _module(name)
    model = mod.build_model()
    ref = copy.deepcopy(model)
    apply(model, _with(plans[name], **plan_kw), debug_poison=True)
    return mod, model, ref


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_gradients_equal_plain_training(plans, name, alpha):
    if name not in plans:
        pytest.skip("transformers is not installed")
    mod, model, ref = _pair(name, plans, alpha=alpha)
    _steps_equal(mod, model, ref, (96, 131))  # 131 tokens: alpha * 131 is no whole number
    runner = model._memoplan_runner
    n = len(plans[name].layers)
    assert runner.calls == 2 * n
    if alpha < 1.0:
        assert runner.recomputed_tokens > 0  # dropped tokens really were rebuilt
    else:
        assert runner.recomputed_tokens == 0
    # every offloaded layer (0..n-2; the last is kept) had its data prefetched during the next
    # layer's backward, in both iterations
    assert runner.prefetched_ahead == 2 * (n - 1)
    # batch 1: every tensor the profile found token-wise is split, and no copy is staged
    s = stats(model)
    assert s["copied_whole_instead"] == [] and s["staged_copies"] == 0
    # the slab was sized at 96 tokens; 131 tokens needed larger buffers, made and counted
    assert 0 < s["host_buffer_bytes"] - s["host_extra_bytes"] <= s["host_slab_bytes"]
    assert s["host_extra_bytes"] > 0 and s["host_buffer_bytes"] == s["host_bytes"]


@pytest.mark.parametrize("name", ["llama", "gpt"])
@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_split_tensors_copied_by_their_last_tokens_and_a_kept_layers_own_blocks(
        monkeypatch, name, alpha):
    """A plan whose split tensors' layers interleave (``solve.levels.chained_splits``): every
    second offloaded layer copies its last tokens and recomputes its first, into a block that
    grows down, and the kept layer's split tensors have blocks of their own. Loss and gradients
    equal plain training (dropped and copied-out tensors poisoned), at lengths the plan was not
    made for, and every split tensor's buffer is a view of the arena."""
    apply_module = importlib.import_module("memoplan.runtime.apply")  # (`apply` is its function)
    prof = profile_model(ProfileConfig(model_file=EXAMPLES / name / "model.py", seq=128))
    plan = solve_plan(prof, SolveConfig(seq=512, hardware=get_hardware("h200"), time_limit=2.0,
                                        alpha=alpha))
    it = plan.levels["iteration"]
    n = len(plan.layers)
    assert it.grows_down and all(k.startswith(("split[1]:", "split[3]:")) for k in it.grows_down)
    assert any(k.startswith(f"kept[{n - 1}]:") for k in it.offsets)
    assert all(plan.layer.arena[k][2] < 0 for k in it.grows_down)
    copied_last = set()
    forward_layer = apply_module.forward_layer

    def spy(prog, mode, alpha, copier, index, *args, copy_last=False, **kw):
        if copy_last:
            copied_last.add(index)
        return forward_layer(prog, mode, alpha, copier, index, *args, copy_last=copy_last, **kw)

    monkeypatch.setattr(apply_module, "forward_layer", spy)
    mod = _module(name)
    model = mod.build_model()
    ref = copy.deepcopy(model)
    apply(model, plan, debug_poison=True)
    # (the runtime ignoring the last-token copies: NaN at 512) a matmul over the first tokens
    # alone may round differently (its blocking): the differences stay at float32's rounding
    # of the largest gradient
    _steps_equal(mod, model, ref, (96, 131, 512), atol_of_largest=1e-6)
    assert copied_last == {int(k[6:].split("]")[0]) for k in it.grows_down}
    s = stats(model)
    assert s["recomputed_tokens"] > 0 and s["arena_fallbacks"] == 0, s


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_a_batch_of_two(plans, name):
    """Batch 2: the first k tokens of a [batch, seq, hidden] tensor are not dense in memory
    (they are copied in pieces, one per batch row), and the ops that flatten batch and tokens
    for a matmul cannot run on a token subset, so what they feed is copied whole, with a
    warning. Gradients stay exact."""
    mod, model, ref = _pair(name, plans, alpha=0.5)
    tokens = torch.randint(mod.config().vocab_size, (2, 100),
                           generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="copied to host whole"):
        loss = model(tokens).float().pow(2).mean()
    loss.backward()
    ref(tokens).float().pow(2).mean().backward()
    _assert_same(model, ref)
    s = stats(model)
    assert s["pieced_copies"] > 0 and s["staged_copies"] == 0
    assert s["copied_whole_instead"] and s["recomputed_tokens"] > 0


@pytest.mark.parametrize("mode", ["keep", "recompute"])
def test_keep_and_checkpointed_layers(plans, mode):
    mod, model, ref = _pair("llama", plans, mode=mode, alpha=0.0)
    _loss(mod, model, 100).backward()
    _loss(mod, ref, 100).backward()
    _assert_same(model, ref)
    assert model._memoplan_runner.recomputed_tokens == 0


def test_several_iterations_with_an_optimizer_and_gradient_accumulation(plans):
    mod, model, ref = _pair("gpt", plans, alpha=0.5)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref)]
    for step in range(3):
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            for micro in range(2):  # two micro-batches accumulate into .grad
                _loss(mod, m, 64 + 8 * micro).backward()
        _assert_same(model, ref, rtol=1e-5)
        for opt in opts:
            opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_autocast_bfloat16():
    # the plan comes from a profile traced under the same autocast as training
    prof = profile_model(ProfileConfig(model_file=EXAMPLES / "llama" / "model.py", seq=64,
                                       autocast="bfloat16"))
    plan = solve_plan(prof, SolveConfig(seq=8192, hardware=get_hardware("h200"), time_limit=2.0))
    mod = _module("llama")
    model = mod.build_model()
    ref = copy.deepcopy(model)
    apply(model, _with(plan, alpha=0.3), debug_poison=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _loss(mod, model, 64)
        b = _loss(mod, ref, 64)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    _assert_same(model, ref, rtol=1e-6)
    assert model._memoplan_runner.recomputed_tokens > 0
    # a plan profiled without autocast does not match an autocast run: refused, not misused
    plain = profile_model(ProfileConfig(model_file=EXAMPLES / "llama" / "model.py", seq=64))
    other = mod.build_model()
    apply(other, solve_plan(plain, SolveConfig(seq=8192, hardware=get_hardware("h200"),
                                               time_limit=2.0)))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(MemoplanError, match="differs"):
        _loss(mod, other, 64)


def test_no_grad_passes_straight_through(plans):
    mod, model, ref = _pair("llama", plans, alpha=0.5)
    with torch.no_grad():
        a = _loss(mod, model, 80)
        b = _loss(mod, ref, 80)
    assert model._memoplan_runner.calls == 0
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plans_that_do_not_match_are_refused(plans, tmp_path):
    gpt = _module("gpt").build_model()
    with pytest.raises(MemoplanError, match="no layer of class 'LlamaBlock'"):
        apply(gpt, plans["llama"])
    other = _module("llama").build_model()
    layers = [m for m in other.modules() if type(m).__name__ == "LlamaBlock"]
    layers[0].ffn_extra = torch.nn.Linear(2, 2)  # the layer changed since it was profiled
    with pytest.raises(MemoplanError, match="solved for another layer"):
        apply(other, plans["llama"])
    short = dataclasses.replace(plans["llama"], layers=plans["llama"].layers[:2])
    with pytest.raises(MemoplanError, match="for 2 layers"):
        apply(_module("llama").build_model(), short)
    bad = tmp_path / "plan.json"
    bad.write_text("{")
    with pytest.raises(MemoplanError, match="not a valid JSON plan"):
        load_plan(bad)


def test_a_graph_that_differs_from_the_profile_is_refused(plans):
    plan = plans["llama"]
    nodes = [dict(n) for n in plan.layer.nodes]
    first_call = next(i for i, n in enumerate(nodes) if n["class"] != "placeholder")
    nodes[first_call]["target"] = "aten.some_gpu_kernel.default"
    mod = _module("llama")
    model = mod.build_model()
    apply(model, dataclasses.replace(plan, layer=dataclasses.replace(plan.layer, nodes=tuple(nodes))))
    with pytest.raises(MemoplanError, match="differs from the profiled layer"):
        _loss(mod, model, 64)


def test_load_plan_round_trip(plans, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plans["gpt"].to_json()))
    assert load_plan(path) == plans["gpt"]


def test_runtime_does_not_import_the_solver_or_mip():
    import subprocess
    import sys

    code = ("import sys, memoplan.runtime, memoplan.emit; "
            "print('mip' in sys.modules, 'memoplan.solve' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
