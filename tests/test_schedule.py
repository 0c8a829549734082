"""The memory schedule meets the plan: while layer i+1 runs its backward, layer i holds only
what comes back from the host (its copied tokens, input and mixing outputs); the buffers of its
recomputed tokens exist from its own backward on, right after its copied tokens (one contiguous
tensor), in the plan (growing level-2 blocks) and in the run."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLES
from memoplan.hardware import get_hardware
from memoplan.ir import Profile, Steps
from memoplan.runtime import apply, execute
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.loader import load_model_file

PROFILES = EXAMPLES / "profiles"


def _held_during_next_backward(plan, i: int) -> int:
    """Bytes of the level-2 blocks of layer i live at layer i+1's backward step."""
    it = plan.levels["iteration"]
    step = Steps(len(plan.layers)).backward(i + 1)
    total = 0
    for name, (start, end) in it.lifetimes.items():
        if f"[{i}]" in name and start <= step < end:
            grow, grow_at = it.grows.get(name, (0, end))
            total += it.sizes[name] + (grow if step >= grow_at else 0)
    return total


@pytest.mark.parametrize("seq", [64 * 1024, 128 * 1024])
def test_7b_stack_layer0_holds_only_its_host_bytes_during_layer1_backward(seq):
    prof = Profile.from_json(json.loads((PROFILES / "llama7b_stack2.json").read_text()))
    assert any(t.token_outer for t in prof.layer.saved)
    cfg = SolveConfig(seq=seq, hardware=get_hardware("h200"), time_limit=5.0, keep_last=1)
    plan = solve_plan(prof, cfg)
    assert plan.layers[0].mode == "offload"
    held = _held_during_next_backward(plan, 0)
    assert held <= plan.layers[0].host_bytes, (held, plan.layers[0].host_bytes)
    if plan.layers[0].alpha == 1.0:  # (128K: attention's forward hides every copy)
        return
    # the arena shrinks accordingly: against the same plan with every split tensor's full
    # buffer back a layer early (the old schedule: no token layout known)
    early = dataclasses.replace(prof, layer=dataclasses.replace(prof.layer, saved=tuple(
        dataclasses.replace(t, token_outer=False) for t in prof.layer.saved)))
    before = solve_plan(early, cfg)
    assert _held_during_next_backward(before, 0) > plan.layers[0].host_bytes
    assert plan.arena_bytes <= before.arena_bytes
    print(f"{seq // 1024}K: layer 0 holds {held / 2**30:.2f} GiB during layer 1's backward "
          f"(host bytes {plan.layers[0].host_bytes / 2**30:.2f} GiB; was "
          f"{_held_during_next_backward(before, 0) / 2**30:.2f}); arena "
          f"{plan.arena_bytes / 2**30:.2f} GiB, was {before.arena_bytes / 2**30:.2f}")


@pytest.fixture(scope="module")
def profiles():
    return {name: profile_model(ProfileConfig(model_file=EXAMPLES / name / "model.py", seq=128))
            for name in ("llama", "gpt")}


@pytest.mark.parametrize("name", ["llama", "gpt"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_run_holds_what_the_plan_says_while_the_layer_above_runs_its_backward(
        profiles, name, alpha, monkeypatch):
    """The arena bytes layer i holds when layer i+1's backward starts are at most the plan's
    figure for that step. For gpt (every split tensor has its tokens outermost) that is its
    host bytes; llama's GQA k/v (heads before tokens in memory) come back whole, as planned."""
    plan = solve_plan(profiles[name], SolveConfig(seq=256, hardware=get_hardware("h200"),
                                                  time_limit=2.0, keep_last=1, alpha=alpha))
    mf = load_model_file(EXAMPLES / name / "model.py")
    model = mf.build_model()
    ref = copy.deepcopy(model)
    apply(model, plan, debug_poison=True)
    loss = mf.loss_fn or (lambda out: out.float().pow(2).mean())
    runner = model._memoplan_runner
    held: dict[int, int] = {}
    own = execute._own_buffers

    def watch(state, copier, arena):
        # layer state.index's backward starts; layer index-1's copies are on their way
        below = state.index - 1
        if below >= 0:
            held[below] = sum(l.used if l.name.startswith("prefetch") else l.size
                              for l in arena.leases.values()
                              if l.name.startswith((f"prefetch[{below}]", f"split[{below}]")))
        own(state, copier, arena)

    monkeypatch.setattr(execute, "_own_buffers", watch)
    for step in range(2):
        for m in (model, ref):
            m.zero_grad()
        loss(model(*mf.example_inputs(256))).backward()
        loss(ref(*mf.example_inputs(256))).backward()
        for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9, msg=name)
    offloaded = [l for l in plan.layers if l.mode == "offload"]
    assert offloaded and set(held) == {l.index for l in offloaded}
    for l in offloaded:
        assert held[l.index] <= _held_during_next_backward(plan, l.index), (l.index, held)
        if name == "gpt":  # what comes back from the host, and no more
            assert held[l.index] <= l.host_bytes, (l.index, held[l.index], l.host_bytes)
    assert runner.arena.misses == 0
    assert any(b.startswith("split[") for b in runner.arena.blocks)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_without_the_arena_the_recomputed_tokens_also_come_late(profiles, alpha):
    """A GPU run without the planned allocator has no arena: there too, while layer i+1 runs
    its backward, layer i holds only its copied tokens (in buffers of their own); its full
    buffers are made at its own backward, the copied tokens moved in. Exact gradients."""
    plan = solve_plan(profiles["gpt"], SolveConfig(seq=256, hardware=get_hardware("h200"),
                                                   time_limit=2.0, keep_last=1, alpha=alpha))
    mf = load_model_file(EXAMPLES / "gpt" / "model.py")
    model = mf.build_model()
    ref = copy.deepcopy(model)
    apply(model, plan, debug_poison=True, arena=False)
    held: dict[int, int] = {}
    prefetch = execute.prefetch_layer

    def watch(state, copier, arena, device):
        prefetch(state, copier, arena, device)
        if state.index not in held:  # during layer index+1's backward: what came back so far
            held[state.index] = sum(t.untyped_storage().nbytes() for t in state.full.values()) \
                + sum(t.untyped_storage().nbytes() for t in state.head.values())

    apply_module = importlib.import_module("memoplan.runtime.apply")
    original = apply_module.prefetch_layer
    apply_module.prefetch_layer = watch
    try:
        for m in (model, ref):
            m(*mf.example_inputs(256)).float().pow(2).mean().backward()
    finally:
        apply_module.prefetch_layer = original
    for (name, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9, msg=name)
    split = [l for l in plan.layers if l.mode == "offload"]
    assert split and set(held) == {l.index for l in split}
    for l in split:  # no full buffer yet: only the copied tokens of the split tensors
        assert held[l.index] <= l.host_bytes, (l.index, held[l.index], l.host_bytes)
