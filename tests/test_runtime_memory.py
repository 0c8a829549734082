"""The runtime's live memory on a CPU: replaying a layer drops every value after its last use,
so a layer's forward and backward hold about what the profile's request trace (the plan's
input) says, not every intermediate of the layer at once."""

from __future__ import annotations

import importlib.util
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import EXAMPLES
from memoplan.hardware import get_hardware
from memoplan.runtime import apply
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.requests import peak_live_bytes

SEQ = 128


class LiveBytes(TorchDispatchMode):
    """Largest total of bytes of storages created inside the mode that are alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list] = {}
        self.size: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                self.refs.setdefault(ptr, []).append(weakref.ref(t))
                self.size[ptr] = t.untyped_storage().nbytes()
        live = 0
        for ptr in list(self.refs):
            alive = [r for r in self.refs[ptr] if r() is not None]
            if alive:
                self.refs[ptr] = alive
                live += self.size[ptr]
            else:
                del self.refs[ptr]
        self.peak = max(self.peak, live)
        return out


def _one_layer(name: str):
    """A model under a plan (offload, alpha 0.5), its first layer and that layer's arguments."""
    spec = importlib.util.spec_from_file_location(f"mem_{name}", EXAMPLES / name / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    prof = profile_model(ProfileConfig(model_file=EXAMPLES / name / "model.py", seq=SEQ))
    plan = solve_plan(prof, SolveConfig(seq=SEQ, hardware=get_hardware("h200"), time_limit=2.0,
                                        alpha=0.5))
    model = mod.build_model()
    layer = next(m for m in model.modules() if type(m).__name__ == plan.layer_class)
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k), with_kwargs=True)
    with torch.no_grad():
        inputs = mod.example_inputs(SEQ)
        model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    hook.remove()
    apply(model, plan)
    args = pytree.tree_map_only(
        torch.Tensor, lambda t: t.detach().requires_grad_(t.is_floating_point()), seen["a"])
    return prof, plan, model, layer, args, seen["k"]


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_a_layer_holds_what_the_trace_says(name):
    prof, plan, model, layer, args, kwargs = _one_layer(name)
    assert plan.layers[0].mode == "offload" and plan.layers[0].alpha == 0.5
    layer(*args, **kwargs)  # the first call traces the layer; measure the next one
    runner = model._memoplan_runner
    before = runner.host_bytes
    fwd = LiveBytes()
    with fwd:
        out = layer(*args, **kwargs)
    host = runner.host_bytes - before  # on a CPU the host copies are live bytes too
    out = out[0] if isinstance(out, tuple) else out
    bwd = LiveBytes()
    with bwd:
        out.backward(torch.ones_like(out))
    skeletal = sum(t.law.at(SEQ) for t in prof.layer.tensors if t.role == "skeletal")
    trace_fwd = peak_live_bytes(list(prof.layer.requests_forward))
    trace_bwd = peak_live_bytes(list(prof.layer.requests_backward))
    # forward: the trace's peak plus the host copies; backward: the rebuilt skeletal tensors,
    # the host copies and the trace's backward peak. 20% for the layer's output and the
    # temporaries of copying and joining token ranges.
    assert host > 0
    assert fwd.peak <= 1.2 * (trace_fwd + host), (fwd.peak, trace_fwd, host)
    assert bwd.peak <= 1.2 * (skeletal + host + trace_bwd), (bwd.peak, skeletal, host, trace_bwd)
