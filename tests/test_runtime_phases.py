"""The plan describes what the run holds: at the head phase (after the last layer's forward,
until its backward starts) the runtime's live bytes outside the arena stay within the plan's
figure for that phase, the level-2 blocks live then plus what the plan budgets outside the
arena (``pool_bytes``: the embedding's output, logits and loss) and the shared layer inputs."""

from __future__ import annotations

import contextlib
import weakref

import torch

from conftest import EXAMPLES
from memoplan.hardware import get_hardware
from memoplan.ir import Steps
from memoplan.runtime import apply
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.head import LiveBytes
from memoplan.trace.loader import load_model_file

SEQ = 256


def test_head_phase_live_bytes_within_the_plan():
    model_file = EXAMPLES / "llama" / "model.py"
    prof = profile_model(ProfileConfig(model_file=model_file, seq=128))
    plan = solve_plan(prof, SolveConfig(seq=SEQ, hardware=get_hardware("h200"), time_limit=2.0))
    mf = load_model_file(model_file)
    model = apply(mf.build_model(), plan)
    last = model.layers[-1]

    def step(mode: LiveBytes | None) -> None:
        def started(module, args, out):
            if mode is not None:
                mode.measuring = True
                out.register_hook(lambda g: setattr(mode, "measuring", False))  # its backward
        h = last.register_forward_hook(started)
        model(*mf.example_inputs(SEQ)).float().pow(2).mean().backward()
        h.remove()

    step(None)  # the first step makes the programs, the arena, the host slab and the grads
    # the arena, the host slab, the parameters and their grads were made then: not counted
    mode = LiveBytes(measuring=False)
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
    """At each layer's forward, rebuild and backward the run holds, outside the
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
    mode = LiveBytes(measuring=False)  # (what the first step made is not counted)
    steps = Steps(len(plan.layers))
    peaks: dict[int, int] = {}
    phase = runner.phase

    @contextlib.contextmanager
    def watched(name, index, device, prog):
        step = {"forward": steps.forward, "recompute": steps.rebuild,
                "backward": steps.backward}[name](index)
        mode.measuring, mode.peak = True, 0
        with phase(name, index, device, prog):
            yield
            claimed = sum(l.size if l.name.startswith("split") else l.used
                          for l in runner.arena.leases.values())
            peaks[step] = max(peaks.get(step, 0), mode.peak + claimed)
        mode.measuring = False

    runner.phase = watched
    with mode:
        run()
    it = plan.levels["iteration"]
    shared = plan.predicted.gpu_bytes["plan"] - plan.arena_bytes - plan.state_bytes \
        - plan.pool_bytes
    assert set(peaks) == {f(i) for i in range(len(plan.layers))
                          for f in (steps.forward, steps.rebuild, steps.backward)}
    # a CPU run has no cuBLAS or flash workspaces: the rest of what lies outside the arena
    outside = plan.pool_bytes - plan.solver["pool_parts"]["workspaces"]
    for step, held in sorted(peaks.items()):
        live = sum(it.sizes[k] + (it.grows.get(k, (0, step + 1))[0]
                                  if step >= it.grows.get(k, (0, step + 1))[1] else 0)
                   for k, (a, b) in it.lifetimes.items() if a <= step < b)
        assert held <= live + outside + shared, (step, held, live)
