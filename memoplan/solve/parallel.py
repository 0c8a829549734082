"""What FSDP2 and context parallelism add to one GPU's memory, beyond the layer's own trace.

Sizes are per rank, at the local length S/cp and divided by tp (``solve.swap``).

Ring attention. The runtime runs PyTorch's ring (``_templated_ring_attention`` and its backward
in ``torch.distributed.tensor.experimental``); its buffers, per attention op, live while that op
runs, and are budgeted as named level-1 requests around it (``ring_requests``). With O the bytes
of the op's output at the local length (E elements; F = 4E its fp32 size; R = 4 bytes per row:
the fp32 logsumexp), and K and V taken as large as the output (Llama-style layers repeat K/V
heads before attention; with fewer K/V heads this is an upper bound), KV = 2 O:

forward
  ``kv``     K/V going round: with ``alltoall`` the block being used, its send copy
             (``torch.cat`` of K and V, held by the collective while the step runs) and the
             next block received: 3 KV (2 KV at cp 2, which exchanges once); with
             ``allgather`` every rank's block: cp KV (its send copy is gone by the first merge)
  ``merge``  ``_SDPAMerger`` in fp32: the merged output and logsumexp, the block's fp32 copy
             and the merge's two temporaries, 4 (F + R), plus the block's own output, O
backward
  ``kv``     as in forward, but ``allgather`` keeps a send copy each step: (cp + 1) KV
  ``dkv``    the fp32 dK/dV accumulators travelling with the blocks (always all-to-all): the
             received ones, their send copy and the next received: 3 x 2F
  ``dq``     the fp32 dq accumulator and its copy when half of it is updated, 2F, plus one
             step's dq, dk, dv in the compute dtype, 3 O, and the ring's final dq, dk, dv,
             3 O (under the planned allocator they are made in the ring's span and then copied
             into the op's own gradient slots of the trace)

The op's own output, logsumexp and gradients are in the trace already (the ring's final
results replace them), and flash attention's dq accumulator inside each step is counted with
the kernel workspaces (``solve.levels.workspace_bytes``). ``tests/test_solve_parallel.py`` runs
PyTorch's ring on a fake process group and checks these against what it holds.

Model states (weights, gradients, optimizer states) are sharded by FSDP2 over the dp x cp ranks
and divided by tp: ``state_bytes_per_param`` x parameters / (dp cp tp) per GPU. FSDP2 (when it
shards: dp x cp > 1) keeps beside them, per GPU:
``fsdp_unsharded_params``, the parameters of the layer running and of the one prefetched, in
the dtype the layer was profiled in (``MixedPrecisionPolicy.param_dtype``): 2 x a layer's
parameter bytes; and ``fsdp_reduce_scatter``, the reduce-scatter input of a layer's gradients
in fp32 (``reduce_dtype=float32``, as torchtitan sets it; bf16 would halve it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from memoplan.ir import Profile, SavedTensor
from memoplan.solve.config import SolveConfig
from memoplan.solve.swap import aligned, per_gpu_bytes

Request = tuple[str, int | str, int]


def attention_ops(profile: Profile) -> list[list[SavedTensor]]:
    """The saved outputs of each fused attention op of the layer, its output (``[0]``) first."""
    ops: list[list[SavedTensor]] = []
    for t in profile.layer.saved:
        if t.kind != "mixing_output" or "attention" not in t.producer:
            continue
        if t.producer.endswith("[0]"):
            ops.append([t])
        elif ops and t.producer.rsplit("[", 1)[0] == ops[-1][0].producer.rsplit("[", 1)[0]:
            ops[-1].append(t)
    return [op for op in ops if len(op[0].shape) >= 3 and math.prod(op[0].shape)]


def ring_workspace(profile: Profile, cfg: SolveConfig) -> dict[str, dict[str, int]]:
    """Bytes of one attention op's ring buffers, per phase and name (module docstring); empty
    without context parallelism. Every attention op of a layer has the same buffers (the
    first op's shape is used for all)."""
    ops = attention_ops(profile)
    if cfg.cp == 1 or not ops:
        return {}
    out = ops[0][0]
    o = per_gpu_bytes(out.law, cfg)
    elems = o / (out.bytes / math.prod(out.shape))
    f, r = 4 * elems, 4 * elems / out.shape[-1]
    kv = 2 * o  # K and V
    if cfg.rotate_method == "alltoall":
        kv_fwd = kv_bwd = (2 if cfg.cp == 2 else 3) * kv
    else:
        kv_fwd, kv_bwd = cfg.cp * kv, (cfg.cp + 1) * kv
    return {"forward": {"kv": aligned(kv_fwd, cfg), "merge": aligned(4 * (f + r) + o, cfg)},
            "backward": {"kv": aligned(kv_bwd, cfg), "dkv": aligned(3 * 2 * f, cfg),
                         "dq": aligned(2 * f + 6 * o, cfg)}}


def ring_requests(profile: Profile, cfg: SolveConfig, phase: str,
                  requests: Sequence[Request]) -> list[Request]:
    """``requests`` (the phase's trace, at one GPU's sizes) with each attention op's ring
    buffers (``ring:NAME``) allocated before the op's outputs and freed right after them."""
    buffers = ring_workspace(profile, cfg).get(phase, {})
    if not buffers:
        return list(requests)
    spans = [s for op in attention_ops(profile) if (s := _op_span(profile, phase, op))]
    starts, ends = {a for a, _ in spans}, {b for _, b in spans}
    out: list[Request] = []
    for k, req in enumerate(requests):
        if k in starts:
            out += [("malloc", f"ring:{name}", size) for name, size in buffers.items()]
        out.append(req)
        if k in ends:
            out += [("free", f"ring:{name}", size) for name, size in buffers.items()]
    return out


def _op_span(profile: Profile, phase: str, op: list[SavedTensor]) -> tuple[int, int] | None:
    """First and last index, in the phase's request list, of the mallocs of the step that runs
    the attention op (forward) or its backward. Forward: the mallocs of its saved outputs.
    Backward: the attention backward is the last reader of those outputs, so its step's frees
    include theirs; its mallocs (dq, dk, dv) are the run of mallocs right before those frees
    (a run that may start a few allocation-only steps early, which cannot raise the peak: live
    bytes only grow along it). None when the trace does not show the op."""
    ids = {t.tensor_id for t in op}
    if phase == "forward":
        at = [k for k, (o, i, _) in enumerate(profile.layer.requests_forward)
              if o == "malloc" and i in ids]
        return (min(at), max(at)) if at else None
    reqs = profile.layer.requests_backward
    frees = [k for k, (o, i, _) in enumerate(reqs) if o == "free" and i in ids]
    if not frees:
        return None
    k = max(frees)
    while k > 0 and reqs[k - 1][0] == "free":
        k -= 1
    last = k - 1
    while k > 0 and reqs[k - 1][0] == "malloc":
        k -= 1
    return (k, last) if last >= k else (k, k)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def state_bytes_per_gpu(profile: Profile, cfg: SolveConfig) -> int:
    """Weights, gradients and optimizer states on one GPU (module docstring)."""
    n_params = profile.model.param_bytes_total / DTYPE_BYTES.get(profile.model.dtype, 4)
    return int(n_params * cfg.state_bytes_per_param / (cfg.fsdp_degree * cfg.tp))


def fsdp_headroom(profile: Profile, cfg: SolveConfig) -> dict[str, int]:
    """FSDP2's buffers beside the sharded states, per GPU (module docstring); empty when the
    states are not sharded."""
    if cfg.fsdp_degree == 1:
        return {}
    m = profile.model
    layer_params = m.param_bytes_per_layer / cfg.tp
    return {"fsdp_unsharded_params": aligned(2 * layer_params, cfg),
            "fsdp_reduce_scatter": aligned(layer_params / DTYPE_BYTES.get(m.dtype, 4) * 4, cfg)}
