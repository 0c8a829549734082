"""The solve driver: profile + config -> :class:`memoplan.ir.Plan`."""

from __future__ import annotations

from collections.abc import Callable

from memoplan.errors import InfeasibleError
from memoplan.ir import Plan, Prediction, Profile
from memoplan.solve.config import SolveConfig
from memoplan.solve.levels import head_bytes, level1, level2
from memoplan.solve.mip_dsa import MIP_MISSING
from memoplan.solve.swap import decide_swaps, per_gpu_bytes, predict
from memoplan.units import fmt_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def state_bytes_per_gpu(profile: Profile, cfg: SolveConfig) -> int:
    """Weights, gradients and optimizer states on one GPU (sharded by tensor parallelism)."""
    n_params = profile.model.param_bytes_total / DTYPE_BYTES.get(profile.model.dtype, 4)
    return int(n_params * cfg.state_bytes_per_param / cfg.tp_degree)


def solve_plan(profile: Profile, cfg: SolveConfig, *,
               progress: Callable[[str], None] = lambda m: None) -> Plan:
    """Swap fractions, then level-1 and level-2 address plans; raises InfeasibleError when the
    arena and model states do not fit the GPU."""
    progress("choosing swap fractions")
    decision = decide_swaps(profile, cfg)
    fwd = level1(profile, cfg, "forward", progress)
    bwd = level1(profile, cfg, "backward", progress)
    head = head_bytes(profile, cfg)
    it = level2(decision.layers, decision.bytes, fwd, bwd, head, cfg, progress)
    states = state_bytes_per_gpu(profile, cfg)
    lb = decision.bytes
    gpu_mem = cfg.hardware.gpu_mem_gb * 2**30
    need = it.peak + states + lb.shared
    if need > gpu_mem:
        raise InfeasibleError(
            f"The plan does not fit: {fmt_bytes(need)} per GPU (arena {fmt_bytes(it.peak)} + "
            f"model states {fmt_bytes(states)} + shared inputs {fmt_bytes(lb.shared)}) > "
            f"{fmt_bytes(gpu_mem)} of GPU memory at {cfg.seq} tokens over {cfg.split} GPUs "
            f"({cfg.tokens_per_gpu} tokens each). Use more GPUs (--gpus), a shorter --seq, or "
            f"fewer optimizer bytes per parameter (--state-bytes-per-param)."
        )
    base = predict(decision, cfg)
    n = len(decision.layers)
    transient = max(fwd.peak, bwd.peak) + head
    predicted = Prediction(**{**base.__dict__, "gpu_bytes": {
        "plan": need,
        "keep_all": states + lb.shared + n * lb.total + transient,
        "full_recompute": states + lb.shared + n * lb.input + lb.total + transient,
    }})
    statuses = {k: v.status for k, v in (("forward", fwd), ("backward", bwd), ("iteration", it))}
    notes = []
    if MIP_MISSING and any(s == "greedy-fallback" for s in statuses.values()):
        notes.append(f"python-mip could not be imported ({MIP_MISSING}): addresses come from "
                     f"greedy-by-size, checked but not optimised. Install python-mip for the MIP.")
    if decision.fallback:
        notes.append(decision.fallback)
    if decision.alpha_pcie < 0:
        notes.append("even the always-swapped part (input, mixing outputs) does not hide behind "
                     "a layer's forward at this length: copies will stall compute")
    return Plan(
        profile_hash=profile.hash, layer_class=profile.model.layer_class,
        config={**cfg.to_json(), "profile_seq_len": profile.seq_len},
        layers=decision.layers, arena_bytes=it.peak, lower_bound_bytes=it.lower_bound,
        state_bytes=states, levels={"forward": fwd, "backward": bwd, "iteration": it},
        predicted=predicted,
        solver={"backend": "greedy (no python-mip)" if MIP_MISSING else "python-mip/CBC",
                "status": statuses,
                "gap": {"forward": fwd.gap, "backward": bwd.gap, "iteration": it.gap},
                "seconds": fwd.seconds + bwd.seconds + it.seconds,
                "fallback_used": any(s == "greedy-fallback" for s in statuses.values()),
                "alpha_forced": decision.forced, "alpha_pcie": decision.alpha_pcie,
                "alpha_host": decision.alpha_host, "host_fallback": decision.fallback},
        layer=runtime_layer(profile, cfg), notes=tuple(notes))


def runtime_layer(profile: Profile, cfg: SolveConfig) -> dict:
    """The part of the profile that the runtime reads: how each saved tensor is handled, the
    forward graph it checks its own trace against, and the request order of a forward and a
    backward at the planned length (one GPU's bytes), which the planned allocator replays."""
    full = profile.to_json()["layer"]
    sized = lambda reqs: [[op, tid, per_gpu_bytes(tensors[tid].law.at(cfg.seq), cfg)]  # noqa: E731
                          for op, tid, _ in reqs]
    tensors = {t.id: t for t in profile.layer.tensors}
    return {"saved": [{k: t[k] for k in ("name", "kind", "token_wise", "seq_axis")}
                      for t in full["saved"]],
            "nodes": full["nodes"], "segments": full["segments"],
            "trace_seq": profile.seq_lens[0],  # the length the nodes' shapes were traced at
            "requests": {"forward": sized(profile.layer.requests_forward),
                         "backward": sized(profile.layer.requests_backward)},
            "skeletal": sorted(t.id for t in profile.layer.tensors if t.role == "skeletal"),
            "outputs": sorted(t.id for t in profile.layer.tensors if t.role == "output"),
            "grads": [[t.id, t.name] for t in profile.layer.tensors if t.role == "grad"]}
