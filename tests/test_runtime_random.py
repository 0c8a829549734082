"""Random ops in a layer (dropout): with the same seed before a step, training under a plan
draws the same masks as plain training, and a checkpointed layer's re-run in backward draws
its forward's mask again (the generator state is kept and replayed, as checkpoint does), so
gradients equal plain training in every mode."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from memoplan.hardware import get_hardware
from memoplan.runtime import apply
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.loader import load_model_file

MODEL = Path(__file__).parent / "models" / "random_decoder.py"


@pytest.fixture(scope="module")
def plan():
    prof = profile_model(ProfileConfig(model_file=MODEL, seq=64))
    return solve_plan(prof, SolveConfig(seq=4096, hardware=get_hardware("h200"), time_limit=2.0,
                                        keep_last=1))


@pytest.mark.parametrize("mode", ["recompute", "offload", "keep"])
def test_random_layers_give_the_gradients_of_plain_training(plan, mode):
    n = len(plan.layers)
    plan = dataclasses.replace(plan, layers=tuple(
        dataclasses.replace(l, mode=mode if l.index < n - 1 else "keep", alpha=0.5)
        for l in plan.layers))
    mf = load_model_file(MODEL)
    model = mf.build_model()
    ref = copy.deepcopy(model)
    apply(model, plan, debug_poison=True)
    for step in range(2):
        grads = []
        for m in (model, ref):
            m.zero_grad()
            torch.manual_seed(100 + step)
            m(*mf.example_inputs(48)).float().pow(2).mean().backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    prog = next(iter(model._memoplan_runner.programs.values()))
    assert prog.random
