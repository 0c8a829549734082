"""The solve driver: profile + config -> :class:`memoplan.ir.Plan`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from memoplan.errors import InfeasibleError
from memoplan.ir import Plan, Prediction, Profile
from memoplan.solve.config import SolveConfig
from memoplan.solve.dsa import solve_greedy
from memoplan.solve.levels import head_bytes, level1, level2, level2_blocks, pool_bytes, pool_parts
from memoplan.solve.mip_dsa import MIP_MISSING
from memoplan.solve.parallel import attention_ops, ring_workspace, state_bytes_per_gpu
from memoplan.solve.scripts import runtime_layer
from memoplan.solve.swap import SwapDecision, decide_swaps, predict
from memoplan.units import fmt_bytes


def _head_hint(head: int, need: int) -> str:
    """Advice when the model's head (logits, loss and their gradients) is a large part."""
    if head < need / 4:
        return ""
    return (f" The model's code after the layers (logits, loss and their gradients) holds "
            f"{fmt_bytes(head)} of it: a loss computed a chunk of tokens at a time holds the "
            f"logits, their gradient and one chunk (examples/llama/model.py's loss_fn does), "
            f"and `memoplan profile` measures what it holds.")


def solve_plan(profile: Profile, cfg: SolveConfig, *,
               progress: Callable[[str], None] = lambda m: None) -> Plan:
    """Swap fractions, then level-1 and level-2 address plans; raises InfeasibleError when the
    arena and model states do not fit the GPU."""
    fwd = level1(profile, cfg, "forward", progress)
    bwd = level1(profile, cfg, "backward", progress)
    auto = cfg.keep_last is None
    if auto:
        progress("choosing how many last layers stay on the GPU")
        cfg = replace(cfg, keep_last=auto_keep_last(profile, cfg, fwd.peak, bwd.peak))
    progress("choosing swap fractions")
    decision = decide_swaps(profile, cfg)
    check_pinned(decision, cfg)
    head = head_bytes(profile, cfg)
    it = level2(decision.layers, decision.bytes, fwd, bwd, cfg, progress)
    states = state_bytes_per_gpu(profile, cfg)
    lb = decision.bytes
    parts = pool_parts(profile, cfg, lb)
    pool = sum(parts.values())
    gpu_mem = cfg.hardware.gpu_mem_gb * 2**30
    need = it.peak + states + lb.shared + pool
    if need > gpu_mem:
        raise InfeasibleError(
            f"The plan does not fit: {fmt_bytes(need)} per GPU (arena {fmt_bytes(it.peak)} + "
            f"model states {fmt_bytes(states)} + shared inputs {fmt_bytes(lb.shared)} + "
            f"outside the arena {fmt_bytes(pool)}: " + ", ".join(
                f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in parts.items()) + ") > "
            f"{fmt_bytes(gpu_mem)} of GPU memory at {cfg.seq} tokens on {cfg.gpus} GPUs (dp "
            f"{cfg.dp} x cp {cfg.cp} x tp {cfg.tp}: {cfg.tokens_per_gpu} tokens per GPU). Use "
            f"more GPUs (--gpus), a shorter --seq, or fewer optimizer bytes per parameter "
            f"(--state-bytes-per-param)." + _head_hint(head, need)
        )
    base = predict(decision, cfg)
    n = len(decision.layers)
    transient = max(fwd.peak, bwd.peak) + head
    predicted = Prediction(**{**base.__dict__, "gpu_bytes": {
        "plan": need,
        "keep_all": states + lb.shared + n * lb.total + transient,
        "full_recompute": states + lb.shared + n * lb.input + lb.total + transient,
        "offload_all": states + lb.shared + 2 * lb.total + transient,  # two rounding buffers
    }})
    statuses = {k: v.status for k, v in (("forward", fwd), ("backward", bwd), ("iteration", it))}
    notes = []
    if MIP_MISSING:
        optimal = all(s == "optimal" for s in statuses.values())
        notes.append(f"python-mip could not be imported ({MIP_MISSING}): addresses come from "
                     f"greedy-by-size and the order search, checked"
                     + (" (and at the lower bound here)" if optimal else ", without the MIP")
                     + ". Install python-mip for the MIP.")
    if auto:
        n_keep = sum(l.mode == "keep" for l in decision.layers)
        notes.append(f"--keep-last auto: the last {cfg.keep_last} of {n} layers stay on the GPU"
                     + (" (all of them fit)" if cfg.keep_last >= n else
                        " (as many as the GPU holds next to the arena and model states)")
                     + ("" if n_keep == cfg.keep_last else f"; {n_keep} kept in the end"))
    if decision.fallback:
        notes.append(decision.fallback)
    if n * lb.total > decision.host_bytes_per_gpu:
        notes.append(f"offload-all, predicted beside the plan, would pin {fmt_bytes(n * lb.total)} "
                     f"per GPU, more than the {fmt_bytes(decision.host_bytes_per_gpu)} of host "
                     f"memory each GPU has here: that baseline could not run")
    if decision.alpha_pcie < 0:
        notes.append("even the always-swapped part (input, mixing outputs) does not hide behind "
                     "a layer's forward at this length: copies will stall compute")
    if cfg.tp > 1:
        notes.append(f"--tp {cfg.tp} is planned only: memoplan's runtime runs FSDP2 x context "
                     f"parallel and refuses a plan with tp > 1 (config.tp_runtime_supported)")
    if cfg.cp > 1 and not attention_ops(profile):
        notes.append("context parallel, but the layer has no fused attention op: no ring "
                     "attention workspace is budgeted")
    return Plan(
        profile_hash=profile.hash, layer_class=profile.model.layer_class,
        config={**cfg.to_json(), "profile_seq_len": profile.seq_len,
                "ring_workspace": ring_workspace(profile, cfg)},
        layers=decision.layers, arena_bytes=it.peak, lower_bound_bytes=it.lower_bound,
        state_bytes=states, pool_bytes=pool, levels={"forward": fwd, "backward": bwd, "iteration": it},
        predicted=predicted,
        solver={"backend": "greedy + order search (no python-mip)" if MIP_MISSING else "python-mip/CBC",
                "status": statuses,
                "gap": {"forward": fwd.gap, "backward": bwd.gap, "iteration": it.gap},
                "seconds": fwd.seconds + bwd.seconds + it.seconds,
                "fallback_used": any(s == "greedy-fallback" for s in statuses.values()),
                "alpha_forced": decision.forced, "alpha_pcie": decision.alpha_pcie,
                "alpha_host": decision.alpha_host, "host_fallback": decision.fallback,
                "pool_parts": parts,
                # seconds to pin this GPU's host slab, once, before the first step
                "pin_s": cfg.hardware.pin_seconds(sum(d.host_bytes for d in decision.layers))},
        layer=runtime_layer(profile, cfg, {"forward": fwd, "backward": bwd, "iteration": it},
                            decision.layers),
        notes=tuple(notes))


def check_pinned(decision: SwapDecision, cfg: SolveConfig) -> None:
    """Raise InfeasibleError when the host memory the GPUs of a node pin together exceeds the
    node's (each GPU gets its share: ``solve.swap``; a forced --alpha or rounding can pass it)."""
    per_gpu = sum(d.host_bytes for d in decision.layers)
    node = cfg.hardware.host_mem_gb * 2**30
    if per_gpu * cfg.gpus_sharing_node > node:
        raise InfeasibleError(
            f"The plan pins {fmt_bytes(per_gpu)} of host memory per GPU, "
            f"{fmt_bytes(per_gpu * cfg.gpus_sharing_node)} for the {cfg.gpus_sharing_node} GPUs "
            f"of a node, more than its {fmt_bytes(node)} (--host-mem-gb "
            f"{cfg.hardware.host_mem_gb:g}). Lower --alpha, or raise --host-mem-gb if the "
            f"machine has more.")


def auto_keep_last(profile: Profile, cfg: SolveConfig, fwd_peak: int, bwd_peak: int) -> int:
    """The most last layers that can stay on the GPU (at least 1): keeping a layer costs no
    copy and no recomputation, so when everything fits, everything is kept. Memory grows with
    the number kept; a binary search sizes each candidate's arena with greedy-by-size (an upper
    bound of the MIP's, which starts from it) plus model states, shared inputs and the pool."""
    n = profile.model.num_layers
    states = state_bytes_per_gpu(profile, cfg)
    gpu_mem = cfg.hardware.gpu_mem_gb * 2**30

    def fits(k: int) -> bool:
        d = decide_swaps(profile, replace(cfg, keep_last=k))
        blocks = [b for b in level2_blocks(d.layers, d.bytes, fwd_peak, bwd_peak, cfg.align)
                  if not b.is_trivial]
        arena = solve_greedy(blocks).peak
        return arena + states + d.bytes.shared + pool_bytes(profile, cfg, d.bytes) <= gpu_mem

    lo, hi = 1, n  # lo: kept when nothing more fits (the last layer's backward follows at once)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
