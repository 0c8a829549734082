"""The plan describes what the run holds: at the head phase (after the last layer's forward,
until its backward starts) the runtime's live bytes outside the arena stay within the plan's
figure for that phase, the level-2 blocks live then plus what the plan budgets outside the
arena (``pool_bytes``: the embedding's output, logits and loss) and the shared layer inputs."""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import EXAMPLES
from memoplan.hardware import get_hardware
from memoplan.ir import Steps
from memoplan.runtime import apply
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.loader import load_model_file

SEQ = 256


class PhaseLiveBytes(TorchDispatchMode):
    """Peak of the bytes of storages made inside the mode and alive at once, counted only while
    ``on`` is set; storages of ``exclude`` (arena, host slab, parameters, grads) are left out."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.refs: dict[int, list] = {}
        self.size: dict[int, int] = {}
        self.on = False
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.data_ptr() in self.exclude or not st.nbytes():
                    continue
                self.refs.setdefault(st.data_ptr(), []).append(weakref.ref(t))
                self.size[st.data_ptr()] = st.nbytes()
        live = 0
        for ptr in list(self.refs):
            alive = [r for r in self.refs[ptr] if r() is not None]
            if alive:
                self.refs[ptr] = alive
                live += self.size[ptr]
            else:
                del self.refs[ptr]
        if self.on:
            self.peak = max(self.peak, live)
        return out


def test_head_phase_live_bytes_within_the_plan():
    model_file = EXAMPLES / "llama" / "model.py"
    prof = profile_model(ProfileConfig(model_file=model_file, seq=128))
    plan = solve_plan(prof, SolveConfig(seq=SEQ, hardware=get_hardware("h200"), time_limit=2.0))
    mf = load_model_file(model_file)
    model = apply(mf.build_model(), plan)
    last = model.layers[-1]

    def step(mode: PhaseLiveBytes | None) -> None:
        def started(module, args, out):
            if mode is not None:
                mode.on = True
                out.register_hook(lambda g: setattr(mode, "on", False))  # its backward begins
        h = last.register_forward_hook(started)
        model(*mf.example_inputs(SEQ)).float().pow(2).mean().backward()
        h.remove()

    step(None)  # the first step makes the programs, the arena, the host slab and the grads
    runner = model._memoplan_runner
    exclude = {runner.arena.buffer.untyped_storage().data_ptr()}
    exclude |= {runner.copier._slab.base.untyped_storage().data_ptr()}
    for p in model.parameters():
        exclude |= {p.untyped_storage().data_ptr(), p.grad.untyped_storage().data_ptr()}
    mode = PhaseLiveBytes(exclude)
    with mode:
        step(mode)
    it = plan.levels["iteration"]
    head_step = Steps(len(plan.layers)).head
    in_arena = sum(size for name, size in it.sizes.items()
                   if it.lifetimes[name][0] <= head_step < it.lifetimes[name][1])
    shared = plan.predicted.gpu_bytes["plan"] - plan.arena_bytes - plan.state_bytes \
        - plan.pool_bytes
    planned = in_arena + plan.pool_bytes + shared
    assert plan.pool_bytes > 0 and mode.peak > 0
    assert mode.peak <= planned, (mode.peak, in_arena, plan.pool_bytes, shared)


def test_every_layer_phase_holds_at_most_the_plans_figure():
    """At each layer's forward and backward (with its recomputation) the run holds, outside the
    arena plus what it claims inside it, at most the plan's figure for that step: the level-2
    blocks live then, what it budgets outside the arena and the shared inputs."""
    model_file = EXAMPLES / "gpt" / "model.py"
    prof = profile_model(ProfileConfig(model_file=model_file, seq=128))
    plan = solve_plan(prof, SolveConfig(seq=SEQ, hardware=get_hardware("h200"), time_limit=2.0,
                                        keep_last=1, alpha=0.5))
    mf = load_model_file(model_file)
    model = apply(mf.build_model(), plan)
    run = lambda: model(*mf.example_inputs(SEQ)).float().pow(2).mean().backward()  # noqa: E731
    run()
    runner = model._memoplan_runner
    exclude = {runner.arena.buffer.untyped_storage().data_ptr(),
               runner.copier._slab.base.untyped_storage().data_ptr()}
    for p in model.parameters():
        exclude |= {p.untyped_storage().data_ptr(), p.grad.untyped_storage().data_ptr()}
    mode = PhaseLiveBytes(exclude)
    steps = Steps(len(plan.layers))
    peaks: dict[int, int] = {}
    phase = runner.phase

    @contextlib.contextmanager
    def watched(name, index, device, prog):
        step = steps.forward(index) if name == "forward" else steps.backward(index)
        mode.on, mode.peak = True, 0
        with phase(name, index, device, prog):
            yield
            claimed = sum(l.size if l.name.startswith("split") else l.used
                          for l in runner.arena.leases.values())
            peaks[step] = max(peaks.get(step, 0), mode.peak + claimed)
        mode.on = False

    runner.phase = watched
    with mode:
        run()
    it = plan.levels["iteration"]
    shared = plan.predicted.gpu_bytes["plan"] - plan.arena_bytes - plan.state_bytes \
        - plan.pool_bytes
    assert set(peaks) == {steps.forward(i) for i in range(len(plan.layers))} | \
        {steps.backward(i) for i in range(len(plan.layers))}
    # a CPU run has no cuBLAS or flash workspaces: the rest of what lies outside the arena
    outside = plan.pool_bytes - plan.solver["pool_parts"]["workspaces"]
    for step, held in sorted(peaks.items()):
        live = sum(it.sizes[k] + (it.grows.get(k, (0, step + 1))[0]
                                  if step >= it.grows.get(k, (0, step + 1))[1] else 0)
                   for k, (a, b) in it.lifetimes.items() if a <= step < b)
        assert held <= live + outside + shared, (step, held, live)
