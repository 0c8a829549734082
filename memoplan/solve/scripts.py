"""The runtime's part of a plan: what it places where, per (phase, layer), read and not rebuilt.

- ``scripts``: for each layer's forward and backward, the (bytes, arena offset) of every
  request in order, for the planned allocator to replay: forward transients at their level-1
  offset inside the layer's ``fwd[i]`` block, its saved tensors one after the other in
  ``round[i]`` (a kept layer's split tensors in their own ``kept[i]:NAME`` blocks, where level 2
  has them), its output in the next layer's ``hidden`` block; backward transients inside
  ``bwd[i]``, the gradient of the layer's input in ``grad[i]`` (where it lives until the layer
  below has used it), parameter gradients in the pool (they become ``.grad``: model states,
  outside the arena). The recompute phase has no trace of its requests: its script names the
  ``recompute[i]`` block, where they go first-fit. Under context parallelism the forward and
  backward scripts also name the span of the layer's block that level 1 gives ring
  attention's buffers (``ring``: its ``ring:*`` blocks), where the ring call's requests, which
  no trace lists either, go first-fit while it runs (``runtime.ring``). A checkpointed layer's
  re-run has none: its ring call's requests go into ``recompute[i]`` with the rest of it.
- ``arena``: the blocks the runtime's own buffers live in (``prefetch[i]``, ``split[i]:NAME``):
  (offset, bytes, bytes claimed later), those later bytes right after the block, or right before
  it when negative (a split tensor whose copied tokens are its last ones: its block grows down).
"""

from __future__ import annotations

from collections.abc import Sequence

from memoplan.ir import (PHASES, LayerDecision, LevelPlan, PhaseScript, Profile, RuntimeLayer,
                         RuntimeSaved)
from memoplan.solve.config import SolveConfig
from memoplan.solve.swap import per_gpu_bytes


def runtime_layer(profile: Profile, cfg: SolveConfig, levels: dict[str, LevelPlan],
                  layers: Sequence[LayerDecision]) -> RuntimeLayer:
    """What the runtime reads of this plan (see the module docstring)."""
    full = profile.to_json()["layer"]
    it = levels["iteration"]
    scripts = {ph: tuple(phase_script(profile, cfg, levels, ph, d.index) for d in layers)
               for ph in PHASES}
    arena = {name: _arena_block(it, name) for name in it.offsets
             if name.startswith(("prefetch[", "split["))}
    return RuntimeLayer(
        saved=tuple(RuntimeSaved(name=t.name, kind=t.kind, token_wise=t.token_wise,
                                 seq_axis=t.seq_axis) for t in profile.layer.saved),
        nodes=tuple(full["nodes"]), segments=tuple(full["segments"]),
        trace_seq=profile.seq_lens[0], arena=arena, scripts=scripts)


def _arena_block(it: LevelPlan, name: str) -> tuple[int, int, int]:
    """(offset, bytes, bytes claimed later) of a runtime block: a growing block's first bytes
    and its growth, right after them, or right before them (negative) where it grows down."""
    at, size, grow = it.offsets[name], it.sizes[name], it.grows.get(name, (0, 0))[0]
    return (at + grow, size, -grow) if name in it.grows_down else (at, size, grow)


def phase_script(profile: Profile, cfg: SolveConfig, levels: dict[str, LevelPlan], phase: str,
                 index: int) -> PhaseScript:
    it = levels["iteration"]

    def block(name: str) -> tuple[int | None, int]:
        return it.offsets.get(name), it.sizes.get(name, 0)

    if phase == "recompute":
        at, size = block(f"recompute[{index}]")
        return PhaseScript(region=(at, size) if at is not None and size else None)
    level = levels[phase]
    tensors = {t.id: t for t in profile.layer.tensors}
    base, _ = block(f"{'fwd' if phase == 'forward' else 'bwd'}[{index}]")
    rounding, hidden, grad = block(f"round[{index}]"), block(f"hidden[{index + 1}]"), \
        block(f"grad[{index}]")
    # a kept layer's split tensors with blocks of their own (``solve.levels``): by tensor id
    kept = {t.tensor_id: block(f"kept[{index}]:{t.name}") for t in profile.layer.saved
            if f"kept[{index}]:{t.name}" in it.offsets} if phase == "forward" else {}
    reqs = profile.layer.requests_forward if phase == "forward" else profile.layer.requests_backward
    used = out_used = 0
    seen: dict[int, int] = {}
    slots = []
    for op, tid, _ in reqs:
        if op != "malloc":
            continue
        t = tensors[tid]
        size = per_gpu_bytes(t.law, cfg)
        n = seen[tid] = seen.get(tid, -1) + 1
        key = str(tid) if n == 0 else f"{tid}#{n}"  # ids reused after a free (see dsa)
        offset = -1
        if t.role == "grad":
            # the input's gradient grows with the length; parameters' gradients do not
            if t.law.per_token > 0 and grad[0] is not None and size <= grad[1]:
                offset, grad = grad[0], (None, 0)
        elif phase == "forward" and t.role == "output":  # level 1 has it too, till it ends
            if hidden[0] is not None and out_used + size <= hidden[1]:
                offset, out_used = hidden[0] + out_used, out_used + size
        elif phase == "forward" and tid in kept:
            if n == 0 and size <= kept[tid][1]:
                offset = kept[tid][0]
        elif phase == "forward" and t.role == "skeletal":
            if rounding[0] is not None and used + size <= rounding[1]:
                offset, used = rounding[0] + used, used + size
        elif key in level.offsets and base is not None:
            offset = base + level.offsets[key]
        slots.append((size, offset))
    span = ring_span(level)
    ring = (base + span[0], span[1]) if span is not None and base is not None else None
    return PhaseScript(slots=tuple(slots), ring=ring)


def ring_span(level: LevelPlan) -> tuple[int, int] | None:
    """(offset in the level's block, bytes) of the range its ring attention buffers (the
    ``ring:*`` blocks, ``solve.parallel``) take; None without them. The ring blocks of one
    attention op live together and level 1 usually puts them side by side; where they lie
    apart, the range covers the gap only if no other block that lives while they do is there
    (one made during the op, its outputs or gradients, could be taken by the ring's requests
    before it comes), else it is the widest run of ring blocks without such a gap."""
    ring = sorted((level.offsets[k], level.sizes[k]) for k in level.offsets
                  if k.startswith("ring:"))
    if not ring:
        return None
    lifetimes = [level.lifetimes[k] for k in level.offsets if k.startswith("ring:")]
    first, last = min(a for a, _ in lifetimes), max(b for _, b in lifetimes)
    others = [(level.offsets[k], level.offsets[k] + level.sizes[k]) for k in level.offsets
              if not k.startswith("ring:") and level.lifetimes[k][0] < last
              and first < level.lifetimes[k][1]]
    runs: list[list[int]] = []  # [start, end, ring bytes]
    for at, size in ring:
        if runs and (at <= runs[-1][1] or not any(a < at and runs[-1][1] < b
                                                  for a, b in others)):
            runs[-1][1] = max(runs[-1][1], at + size)
            runs[-1][2] += size
        else:
            runs.append([at, at + size, size])
    start, end, _ = max(runs, key=lambda r: r[2])
    return start, end - start
