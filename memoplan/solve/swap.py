"""Swap fractions per layer (the token-wise swap/recompute split) and the cost model.

For each offloaded layer, the layer input, the mixing outputs and the saved tensors that are not
token-wise are copied to host whole ("always"); a fraction alpha of the token-wise saved tokens
is copied too and the rest is recomputed before the layer's backward. alpha is the largest value
in [0, 1] with

    (always + alpha * token_wise) / B_pcie        <= T_forward       (copy hides behind compute)
    n_offloaded * (always + alpha * token_wise)   <= M_host          (host memory suffices)

where B_pcie and M_host are one GPU's share of its node's (the GPUs of a node copy at once).
The last ``keep_last`` layers are not offloaded (their backward follows at once). When even
alpha = 0 does not fit host memory, only as many layers as fit are offloaded and the others are
checkpointed: their input stays on the GPU and the whole layer is recomputed in backward.

Per-rank shapes. A GPU of a ``dp x cp x tp`` job (``solve.config``) runs the layer on its context
rank's S/cp tokens, and tensor parallelism divides each tensor of it by tp (heads or hidden, or
tokens under sequence parallelism). So, with S the whole sequence:

- sizes (saved tensors, transients, workspaces): the size law at the local length S/cp, divided
  by tp (``per_gpu_bytes``). Not law(S)/(cp tp): a quadratic term c S^2 (eager attention's
  scores) is c (S/cp)^2 on a rank, its local block, cp times less than c S^2/cp;
- token-wise FLOPs: their law at S/cp, divided by tp;
- token-mixing (attention) FLOPs: each rank's S/cp queries meet all S keys as K/V go round the
  ring, so a rank computes the FLOPs of the full sequence / cp, divided by tp, when the work is
  balanced. Load balancing (``load_balance``, PyTorch's default) cuts the sequence into 2 cp
  chunks and gives rank r chunks r and 2cp-1-r: under the causal mask chunk c's queries meet
  c + 1/2 chunks' worth of keys, so every rank does (r + 1/2) + (2cp - 1 - r + 1/2) = 2cp of the
  (2cp)^2/2 = 2cp^2 units, 1/cp of the total. Without it rank r holds chunk r and does r + 1/2
  of cp^2/2 units; the last rank does the most, (cp - 1/2)/(cp^2/2) = (2cp - 1)/cp^2 of the
  total (15/64 instead of 8/64 at cp 8), and every ring step waits for it: a layer's time takes
  that share (``mixing_share``), while MFU still counts the average, total/cp. Ring transfers are
  taken to hide behind each step's attention.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from memoplan.errors import InfeasibleError
from memoplan.ir import FlopSplit, LayerDecision, Prediction, Profile, SizeLaw
from memoplan.solve.config import SolveConfig
from memoplan.timeline import iteration_seconds, schedule
from memoplan.units import fmt_bytes


@dataclass(frozen=True, kw_only=True)
class SplitTensor:
    """A token-wise saved tensor of one layer on one GPU: ``nbytes`` (aligned) over ``tokens``;
    ``outer``: its tokens are outermost in memory, so its copied tokens form a prefix of its
    buffer and can come back a layer before the recomputed ones (``solve.levels``)."""

    name: str
    nbytes: int
    tokens: int
    row: float        # exact bytes per token
    outer: bool

    def head(self, alpha: float, align: int) -> int:
        """Bytes of its first ``int(alpha * tokens)`` tokens (what the runtime copies), aligned."""
        exact = int(alpha * self.tokens) * self.row
        return min(self.nbytes, int(math.ceil(exact / align) * align))


@dataclass(frozen=True, kw_only=True)
class LayerBytes:
    """Saved bytes of one layer on one GPU at the target length, by how they are handled."""

    input: int
    mixing: int
    fixed: int        # other saved tensors that are not token-wise: copied whole
    token_wise: int   # split by alpha
    shared: int       # shared layer arguments (e.g. RoPE tables): once per GPU, kept
    splits: tuple[SplitTensor, ...] = ()  # the token-wise tensors, one by one

    @property
    def always(self) -> int:
        return self.input + self.mixing + self.fixed

    @property
    def total(self) -> int:
        return self.always + self.token_wise


def aligned(nbytes: float, cfg: SolveConfig) -> int:
    """``nbytes`` rounded up to the allocator's granularity (0 stays 0)."""
    return int(math.ceil(nbytes / cfg.align) * cfg.align) if nbytes > 0 else 0


def per_gpu_bytes(law: SizeLaw, cfg: SolveConfig) -> int:
    """A size law of the layer as one GPU's aligned bytes: at the local length S/cp, divided
    by tp (see the module docstring)."""
    return aligned(max(0.0, law.at(cfg.local_seq)) / cfg.tp, cfg)


def layer_bytes(profile: Profile, cfg: SolveConfig) -> LayerBytes:
    sums = {"input": 0, "mixing": 0, "fixed": 0, "token_wise": 0, "shared": 0}
    splits = []
    for t in profile.layer.saved:
        key = {"input": "input", "mixing_output": "mixing", "shared": "shared"}.get(
            t.kind, "token_wise" if t.token_wise else "fixed")
        nbytes = per_gpu_bytes(t.law, cfg)
        sums[key] += nbytes
        if key == "token_wise":
            tokens = cfg.tokens_per_gpu
            splits.append(SplitTensor(name=t.name, nbytes=nbytes, tokens=tokens,
                                      row=max(0.0, t.law.at(cfg.local_seq)) / cfg.tp / tokens,
                                      outer=t.token_outer and t.seq_axis is not None))
    return LayerBytes(**sums, splits=tuple(splits))


# ---- the cost model -------------------------------------------------------------------------
#
# A roofline per op class, from the profile's own graph. One phase of one layer on one GPU takes
#
#     matmul FLOPs / matmul_tflops + attention FLOPs / attn_{fwd,bwd}_tflops
#         + bytes moved by memory-bound ops / hbm_gbps
#
# - matmul FLOPs: the profile's token-wise FLOPs (torch's FLOP counter counts only matmul-like
#   ops: mm, addmm, bmm, convolution ...), at the local length S/cp, divided by tp;
# - attention FLOPs: the profile's token-mixing FLOPs when the layer mixes tokens with a fused
#   attention kernel (causal counted as half of full, backward as twice forward: as
#   ``memoplan.hardware`` defines the rates), the full sequence's times ``mixing_share``, / tp;
#   other mixing ops (eager attention's bmm) run at the matmul rate;
# - memory-bound bytes: every storage the phase allocates (``layer.tensors``, with its size law
#   at S/cp, / tp) that a matmul or fused-attention op did not make is written once and read
#   at least once: 2 x its bytes. The op that made a storage is its forward node's target, or
#   for backward storages (the profile keeps no backward graph) the op in its fx name
#   (``mm_3``, ``silu_backward``); a multi-output op's backward outputs (``getitem_N``) count
#   as memory-bound.
#
# Keep-all is forward + backward per layer, full recompute adds a forward, offload-all and the
# plan follow the copy schedule (``memoplan.timeline``), whose recomputation of dropped tokens
# costs (1 - alpha) x the forward's token-wise part (matmuls and memory-bound ops, no mixing).

MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_grouped_mm",
                        "_scaled_mm", "convolution", "_convolution", "convolution_backward",
                        "cudnn_convolution"})


def _op(node_name: str, nodes: dict) -> str:
    """The aten op that made a storage: its forward node's target (a getitem's: the op it
    reads), else the op in its fx name (``mm_12`` -> ``mm``, ``add__1`` -> ``add_``)."""
    n = nodes.get(node_name)
    if n is not None and n.target != "placeholder":
        if n.target.endswith("getitem>") and n.args and isinstance(n.args[0], dict):
            n = nodes.get(n.args[0].get("node"), n)
        parts = n.target.split(".")
        return parts[1] if parts[0] == "aten" and len(parts) > 1 else n.target
    return re.sub(r"_\d+$", "", node_name)


def fused_attention(profile: Profile) -> bool:
    """Whether the layer mixes tokens with a fused attention kernel (its own rates) rather
    than with matmuls (eager attention: the matmul rate)."""
    return any("attention" in op for op in profile.layer.mixing_ops)


def memory_bound_laws(profile: Profile) -> dict[str, SizeLaw]:
    """Bytes moved by memory-bound ops, as laws in the length: ``forward`` (token-wise ops),
    ``forward_mixing`` (memory-bound token-mixing ops, such as eager attention's softmax) and
    ``backward`` (see the comment above)."""
    nodes = {n.name: n for n in profile.layer.nodes}
    coeffs: dict[str, list[float]] = {"forward": [], "forward_mixing": [], "backward": []}
    for t in profile.layer.tensors:
        op = _op(t.name, nodes if t.phase == "forward" else {})
        if op in MATMUL_OPS or "attention" in op:
            continue
        key = t.phase
        if t.phase == "forward" and t.name in nodes and nodes[t.name].cls == "mixing":
            key = "forward_mixing"
        acc = coeffs[key]
        acc += [0.0] * (len(t.law.coeffs) - len(acc))
        for i, c in enumerate(t.law.coeffs):
            acc[i] += 2 * c
    return {k: SizeLaw(coeffs=tuple(v) or (0.0,)) for k, v in coeffs.items()}


@dataclass(frozen=True, kw_only=True)
class LayerTimes:
    forward: float            # seconds of one layer's forward on one GPU (the slowest rank)
    backward: float
    token_wise_forward: float  # the token-wise share of the forward (what recompute re-runs)
    flops_forward: float       # per GPU, on average over the context ranks (what MFU counts)
    flops_backward: float
    # seconds by op class, {"forward": {...}, "backward": {...}} with keys matmul, attention,
    # memory (what the phase times add up)
    parts: dict[str, dict[str, float]] = field(default_factory=dict)


def mixing_share(cfg: SolveConfig) -> float:
    """The share of the full sequence's token-mixing FLOPs that the slowest context rank
    computes: 1/cp, or (2cp - 1)/cp^2 for causal ring attention without load balancing (see
    the module docstring)."""
    cp = cfg.cp
    return 1 / cp if cp == 1 or cfg.load_balance else (2 * cp - 1) / cp**2


def layer_times(profile: Profile, cfg: SolveConfig) -> LayerTimes:
    """One layer's seconds and FLOPs on one GPU, at the per-rank shapes (module docstring),
    from the cost model above."""
    hw = cfg.hardware
    local, share, tp = cfg.local_seq, mixing_share(cfg), cfg.tp
    fused = fused_attention(profile)
    mem = memory_bound_laws(profile)
    hbm = hw.hbm_gbps * 1e9

    def parts(f: FlopSplit, phase: str) -> dict[str, float]:
        mixing = f.mixing_law.at(cfg.seq) * share / tp
        attn_rate = (hw.attn_fwd_tflops if phase == "forward" else hw.attn_bwd_tflops) * 1e12
        nbytes = mem[phase].at(local) + (mem["forward_mixing"].at(local)
                                         if phase == "forward" else 0.0)
        return {"matmul": (f.token_wise_law.at(local) / tp + (0.0 if fused else mixing))
                / (hw.matmul_tflops * 1e12),
                "attention": mixing / attn_rate if fused else 0.0,
                "memory": max(0.0, nbytes) / tp / hbm}

    def flops(f: FlopSplit, mixing: float) -> float:  # mixing: the share of the full length's
        return (f.token_wise_law.at(local) + f.mixing_law.at(cfg.seq) * mixing) / tp

    f, b = profile.layer.flops_forward, profile.layer.flops_backward
    fwd, bwd = parts(f, "forward"), parts(b, "backward")
    token_wise = (f.token_wise_law.at(local) / tp / (hw.matmul_tflops * 1e12)
                  + max(0.0, mem["forward"].at(local)) / tp / hbm)
    return LayerTimes(forward=sum(fwd.values()), backward=sum(bwd.values()),
                      token_wise_forward=token_wise,
                      flops_forward=flops(f, 1 / cfg.cp), flops_backward=flops(b, 1 / cfg.cp),
                      parts={"forward": fwd, "backward": bwd})


@dataclass(frozen=True, kw_only=True)
class SwapDecision:
    layers: tuple[LayerDecision, ...]
    alpha_pcie: float          # unclamped alpha allowed by PCIe
    alpha_host: float          # unclamped alpha allowed by host memory
    bytes: LayerBytes
    times: LayerTimes
    pcie_bytes_per_s: float
    host_bytes_per_gpu: float
    fallback: str | None       # what was done when host memory could not hold alpha = 0
    forced: bool


def _alpha_for(budget: float, lb: LayerBytes) -> float:
    """Unclamped alpha that spends ``budget`` bytes on a layer."""
    if lb.token_wise == 0:
        return 1.0 if budget >= lb.always else -1.0
    return (budget - lb.always) / lb.token_wise


def decide_swaps(profile: Profile, cfg: SolveConfig) -> SwapDecision:
    """Per-layer mode and alpha; see the module docstring."""
    lb = layer_bytes(profile, cfg)
    times = layer_times(profile, cfg)
    bw = cfg.hardware.pcie_bytes_per_s(cfg.gpus_sharing_node)
    host = cfg.hardware.host_bytes_per_gpu(cfg.gpus_sharing_node)
    n_layers = profile.model.num_layers
    n_off = max(0, n_layers - cfg.keep_last)
    alpha_pcie = _alpha_for(bw * times.forward, lb)
    slack = cfg.align * len(lb.splits)  # each copied head is rounded up to the alignment
    alpha_host = _alpha_for(host / n_off - slack, lb) if n_off else 1.0
    fallback = None
    n_fit = n_off
    if n_off and alpha_host < 0:
        n_fit = int(host // lb.always) if lb.always else n_off
        fallback = (f"host memory per GPU ({fmt_bytes(host)}) holds the always-swapped part of only "
                    f"{n_fit} of {n_off} offloaded layers ({fmt_bytes(lb.always)} each at alpha=0); "
                    f"the other {n_off - n_fit} are checkpointed: input kept on the GPU, whole layer "
                    f"recomputed in backward")
        alpha_host = _alpha_for(host / n_fit - slack, lb) if n_fit else 0.0
    if cfg.alpha is not None:
        alpha = cfg.alpha
        need = n_fit * (lb.always + alpha * lb.token_wise)
        if need > host + 1:
            raise InfeasibleError(
                f"--alpha {alpha} needs {fmt_bytes(need)} of host memory per GPU for {n_fit} "
                f"offloaded layers, but each GPU has {fmt_bytes(host)} ({cfg.hardware.host_mem_gb} "
                f"GiB per node shared by {cfg.gpus_sharing_node} GPUs). Lower --alpha, or raise "
                f"--host-mem-gb if the machine has more.")
    else:
        alpha = min(1.0, max(0.0, min(alpha_pcie, alpha_host)))
    layers = []
    for i in range(n_layers):
        if i >= n_off:
            layers.append(LayerDecision(index=i, mode="keep", alpha=0.0, swapped_bytes=0,
                                        recomputed_bytes=0, host_bytes=0, gpu_kept_bytes=lb.total))
        elif i >= n_fit:
            layers.append(LayerDecision(index=i, mode="recompute", alpha=0.0, swapped_bytes=0,
                                        recomputed_bytes=lb.total - lb.input, host_bytes=0,
                                        gpu_kept_bytes=lb.input))
        else:
            heads = (sum(t.head(alpha, cfg.align) for t in lb.splits) if lb.splits
                     else int(math.floor(alpha * lb.token_wise)))
            swapped = lb.always + heads  # what the runtime copies out (buffers aligned)
            layers.append(LayerDecision(index=i, mode="offload", alpha=alpha, swapped_bytes=swapped,
                                        recomputed_bytes=lb.total - swapped, host_bytes=swapped,
                                        gpu_kept_bytes=0))
    return SwapDecision(layers=tuple(layers), alpha_pcie=alpha_pcie, alpha_host=alpha_host,
                        bytes=lb, times=times, pcie_bytes_per_s=bw, host_bytes_per_gpu=host,
                        fallback=fallback, forced=cfg.alpha is not None)


def predict(d: SwapDecision, cfg: SolveConfig) -> Prediction:
    """Iteration time and MFU of the plan and of the baselines (keep-all, full recompute,
    offload-all), on one model and one cost model (see above).

    The plan's time is the end of its simulated copy/compute schedule (``memoplan.timeline``):
    compute, plus copies that do not hide, plus recomputation of dropped tokens. Keep-all is
    forward + backward of every layer; full recompute adds a forward per layer; offload-all
    copies every layer's saved tensors out and back on the same schedule (host memory not
    checked). Embedding, head and communication are left out (the same for every strategy).
    """
    t = d.times
    n = len(d.layers)
    bars = schedule(d.layers, forward_s=t.forward, backward_s=t.backward,
                    token_wise_forward_s=t.token_wise_forward, pcie_bytes_per_s=d.pcie_bytes_per_s)
    plan = iteration_seconds(bars)
    everything = [LayerDecision(index=i, mode="offload", alpha=1.0, swapped_bytes=d.bytes.total,
                                recomputed_bytes=0, host_bytes=d.bytes.total, gpu_kept_bytes=0)
                  for i in range(n)]
    seconds = {"plan": plan, "keep_all": n * (t.forward + t.backward),
               "full_recompute": n * (2 * t.forward + t.backward),
               "offload_all": iteration_seconds(schedule(
                   everything, forward_s=t.forward, backward_s=t.backward,
                   token_wise_forward_s=t.token_wise_forward,
                   pcie_bytes_per_s=d.pcie_bytes_per_s))}
    model_flops = n * (t.flops_forward + t.flops_backward)
    peak = cfg.hardware.peak_tflops * 1e12

    def mfu(seconds: float) -> float:
        return model_flops / (seconds * peak) if seconds > 0 else 0.0

    return Prediction(
        forward_s=t.forward, backward_s=t.backward, token_wise_forward_s=t.token_wise_forward,
        pcie_bytes_per_s=d.pcie_bytes_per_s,
        copy_s=max((l.swapped_bytes for l in d.layers), default=0) / d.pcie_bytes_per_s,
        stall_s=sum(b.end - b.start for b in bars if b.kind == "stall"),
        recompute_s=sum(b.end - b.start for b in bars if b.kind == "recompute"),
        iteration_s=seconds, mfu={k: mfu(v) for k, v in seconds.items()},
        gpu_bytes={})
