"""The runtime's first-call trace keeps nothing real: it is made on fake tensors only (no
full-length compute, no clones of parameters or inputs, no random output gradient), its
programs are bounded per model, and training on many lengths retains no more than on one."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from conftest import EXAMPLES
from memoplan.hardware import get_hardware
from memoplan.runtime import apply
from memoplan.runtime.apply import PROGRAMS_KEPT
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.loader import load_model_file

MODEL = EXAMPLES / "llama" / "model.py"


@pytest.fixture(scope="module")
def plan():
    prof = profile_model(ProfileConfig(model_file=MODEL, seq=128))
    return solve_plan(prof, SolveConfig(seq=8192, hardware=get_hardware("h200"), time_limit=2.0))


def _real_storages() -> dict[int, int]:
    """Every real (not fake, not meta) CPU tensor storage alive now: identity -> bytes."""
    gc.collect()
    out = {}
    with warnings.catch_warnings():  # isinstance() on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in tensors:
        if not isinstance(obj, FakeTensor) and obj.device.type == "cpu" \
                and obj.layout == torch.strided:
            st = obj.untyped_storage()
            if st.nbytes():
                out[st.data_ptr()] = st.nbytes()
    return out


def _step(mf, model, seq):
    model.zero_grad(set_to_none=False)
    out = model(*mf.example_inputs(seq))
    out.float().pow(2).mean().backward()


def _retained(model, lengths) -> int:
    """Bytes of real storages alive after steps at ``lengths``, other than the model's own
    parameters and gradients (created by the first step, zeroed, not freed, later)."""
    mf = load_model_file(MODEL)
    for seq in lengths:
        _step(mf, model, seq)
    own = set()
    for p in model.parameters():
        own.add(p.untyped_storage().data_ptr())
        if p.grad is not None:
            own.add(p.grad.untyped_storage().data_ptr())
    return sum(b for ptr, b in _real_storages().items() if ptr not in own)


def test_programs_hold_only_fake_tensors(plan):
    mf = load_model_file(MODEL)
    model = apply(mf.build_model(), plan)
    _step(mf, model, 96)
    progs = list(model._memoplan_runner.programs.values())
    assert progs
    for prog in progs:
        assert prog.trace.flat_inputs == []
        held = [v for v in prog.trace.values.values() if isinstance(v, torch.Tensor)]
        held += [t for v in prog.trace.values.values() if isinstance(v, (tuple, list))
                 for t in v if isinstance(t, torch.Tensor)]
        held += list(prog.trace.gm.parameters()) + list(prog.trace.gm.buffers())
        assert held and all(isinstance(t, FakeTensor) for t in held)


def test_many_lengths_retain_no_more_than_one(plan):
    """Five lengths (longest first, so the host slab sized at the first step serves them all)
    leave as many real bytes alive as one: the programs of the other four hold nothing real.
    Before, each kept real clones of the layer's parameters and inputs and a full-size random
    output gradient (1.4 GiB per length for a 7B layer at 64K)."""
    mf = load_model_file(MODEL)
    one = _retained(apply(mf.build_model(), copy.deepcopy(plan)), [160])
    gc.collect()
    five = _retained(apply(mf.build_model(), copy.deepcopy(plan)), [160, 150, 140, 130, 120])
    assert five <= one, (five, one)


def test_program_cache_is_bounded(plan):
    mf = load_model_file(MODEL)
    model = apply(mf.build_model(), plan)
    for seq in range(64, 64 + PROGRAMS_KEPT + 3):
        _step(mf, model, seq)
    assert len(model._memoplan_runner.programs) == PROGRAMS_KEPT
    model.zero_grad()  # an evicted length still trains right when it comes back
    plain = mf.build_model()
    out = model(*mf.example_inputs(64))
    out.float().pow(2).mean().backward()
    plain(*mf.example_inputs(64)).float().pow(2).mean().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9, msg=n)
