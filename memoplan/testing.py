"""CPU stand-ins for what only a GPU shows, for memoplan's tests and CPU smoke runs.

``flash_attention``: causal or full attention as a custom op pair (forward and backward) that,
like CUDA's ``_scaled_dot_product_flash_attention`` and cuDNN attention, refuses float32
("only support fp16 and bf16"). A small bf16 decoder that uses it as its attention shows on a
CPU whether memoplan ever runs such an op in a precision it refuses (profiling's real-valued
probes, the runtime's replay and recomputation). The forward returns the output, the
float32 log-sum-exp and, as the flash kernels do for dropout, a philox-style seed and offset
(int64 scalars drawn from the default generator, empty without dropout); the backward reads
all four and rebuilds the dropout mask from the seed, so a seed that was redrawn, or
overwritten while it waited for backward, gives wrong gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

_LOW = (torch.bfloat16, torch.float16)


def _refuse_fp32(name: str, *tensors: torch.Tensor) -> None:
    bad = [t.dtype for t in tensors if t.dtype not in _LOW]
    if bad:
        raise RuntimeError(f"{name}: FlashAttention only support fp16 and bf16 data type "
                           f"(got {bad[0]})")


def _scores(q: torch.Tensor, k: torch.Tensor, is_causal: bool) -> torch.Tensor:
    s = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if is_causal:
        n, m = s.shape[-2], s.shape[-1]
        mask = torch.ones(n, m, dtype=torch.bool, device=s.device).triu(m - n + 1)
        s = s.masked_fill(mask, float("-inf"))
    return s


def _keep(shape: torch.Size, seed: torch.Tensor, offset: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask (scaled by 1/(1-p)) that ``seed`` and ``offset`` stand for."""
    g = torch.Generator().manual_seed(int(seed) + int(offset))
    return (torch.rand(shape, generator=g) >= p).float() / (1 - p)


@torch.library.custom_op("memoplan_testing::flash_attention", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                    dropout_p: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, logsumexp, seed, offset) of attention over [..., S, D] inputs; refuses float32."""
    _refuse_fp32("flash_attention", q, k, v)
    s = _scores(q, k, is_causal)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    if dropout_p > 0:
        seed = torch.randint(1 << 40, (), dtype=torch.int64)
        offset = torch.randint(1 << 20, (), dtype=torch.int64)
        p = p * _keep(p.shape, seed, offset, dropout_p)
    else:
        seed, offset = torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return (p @ v.float()).to(q.dtype), lse, seed, offset


@flash_attention.register_fake
def _(q, k, v, is_causal, dropout_p=0.0):
    shape = () if dropout_p > 0 else (0,)
    return (q.new_empty(*q.shape[:-1], v.shape[-1]),
            q.new_empty(q.shape[:-1], dtype=torch.float32),
            q.new_empty(shape, dtype=torch.int64), q.new_empty(shape, dtype=torch.int64))


@torch.library.custom_op("memoplan_testing::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             seed: torch.Tensor, offset: torch.Tensor, is_causal: bool,
                             dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); refuses float32 like the flash backward kernel."""
    _refuse_fp32("flash_attention_backward", grad, q, k, v, out)
    p = torch.exp(_scores(q, k, is_causal) - lse.unsqueeze(-1))
    keep = _keep(p.shape, seed, offset, dropout_p) if dropout_p > 0 else 1.0
    g = grad.float()
    dv = (p * keep).transpose(-2, -1) @ g
    dp = (g @ v.float().transpose(-2, -1)) * keep
    ds = p * (dp - (g * out.float()).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
    dq, dk = ds @ k.float(), ds.transpose(-2, -1) @ q.float()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@flash_attention_backward.register_fake
def _(grad, q, k, v, out, lse, seed, offset, is_causal, dropout_p):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, is_causal, *rest = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.is_causal = is_causal
    ctx.dropout_p = rest[0] if rest else 0.0


def _backward(ctx, grad_out, grad_lse, grad_seed, grad_offset):
    q, k, v, out, lse, seed, offset = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward(grad_out, q, k, v, out, lse, seed, offset,
                                          ctx.is_causal, ctx.dropout_p)
    return dq, dk, dv, None, None


flash_attention.register_autograd(_backward, setup_context=_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              is_causal: bool = True, dropout_p: float = 0.0) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention(q, k, v, is_causal=..., dropout_p=...)``
    that refuses float32 inputs, as the flash kernel does on a GPU."""
    return flash_attention(q, k, v, is_causal, dropout_p)[0]


def _attention_flops(q_shape, k_shape, v_shape, is_causal) -> int:
    """As memoplan counts fused attention: 2*S*S*(d + dv) per head, halved when causal."""
    heads = 1
    for d in q_shape[:-2]:
        heads *= d
    flops = 2 * heads * q_shape[-2] * k_shape[-2] * (q_shape[-1] + v_shape[-1])
    return flops // 2 if is_causal else flops


def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.memoplan_testing.flash_attention)(
        lambda q, k, v, is_causal, *a, **kw: _attention_flops(q, k, v, is_causal))
    register_flop_formula(torch.ops.memoplan_testing.flash_attention_backward)(
        lambda g, q, k, v, o, lse, seed, offset, is_causal, *a, **kw:
        2 * _attention_flops(q, k, v, is_causal))


_register_flops()


_RING_SEQ = 2  # (batch, heads, tokens, head_dim)


def _ring_kernel(q: torch.Tensor) -> str:
    """The attention kernel ``ring_sdpa`` runs on each ring step for ``q``, the one
    ``F.scaled_dot_product_attention`` (and so ``context_parallel``) would pick: "cpu" (CPU
    flash attention), "flash" (CUDA flash attention: float16 and bfloat16) or "efficient"
    (CUDA memory-efficient attention: float32)."""
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type == "cuda":
        return "flash" if q.dtype in _LOW else "efficient"
    raise RuntimeError(f"ring_sdpa: no ring attention kernel for {q.device.type} tensors "
                       f"(CPU and CUDA only)")


@contextlib.contextmanager
def _load_balanced(cp: Any, on: bool) -> Iterator[None]:
    """torch's ring engine with load balancing ``on`` (a module global: restored after)."""
    saved = cp._cp_options.enable_load_balance
    cp._cp_options.enable_load_balance = on
    try:
        yield
    finally:
        cp._cp_options.enable_load_balance = saved


def _ring_forward(kernel: str, group: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(out, logsumexp, what the kernel's backward needs besides q, k, v, out, logsumexp) of
    causal attention over the ring, as torch's context-parallel dispatcher runs each kernel
    (``_scaled_dot_product_ring_*_attention`` in ``_context_parallel/_attention.py``)."""
    from memoplan.runtime.ring import LSE_PAD, efficient_tokens_multiple, engine

    cp, aten = engine(), torch.ops.aten
    if kernel == "cpu":
        out, lse = cp._templated_ring_attention(
            group, _RING_SEQ, aten._scaled_dot_product_flash_attention_for_cpu.default, q, k, v,
            is_causal=True, scale=scale)[:2]
        return out, lse, {}
    if kernel == "flash":
        # the outputs past (out, logsumexp) are those of the ring's last kernel call, as torch's
        # dispatcher gets them: cum_seq_q/k (undefined: no varlen), max_q/k, the philox
        # rng_state and offset (device tensors, unused without dropout), the debug mask
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = cp._templated_ring_attention(
            group, _RING_SEQ, aten._scaled_dot_product_flash_attention.default, q, k, v,
            is_causal=True, dropout_p=0.0, return_debug_mask=False, scale=scale)
        return out, lse, dict(cum_seq_q=cum_q, cum_seq_k=cum_k, max_q=max_q, max_k=max_k,
                              philox_seed=seed, philox_offset=offset)
    # efficient attention pads its logsumexp to a multiple of 32 tokens, which the ring's
    # merge (and, load-balanced, its halving) would broadcast against the output: refused
    # before any collective (every rank of the ring holds as many tokens)
    local = q.shape[_RING_SEQ]
    need = efficient_tokens_multiple(cp._cp_options.enable_load_balance, causal=True)
    if local % need:
        raise RuntimeError(
            f"ring_sdpa: float32 attention on CUDA runs memory-efficient attention, whose "
            f"logsumexp is padded to a multiple of {LSE_PAD} tokens; the ring needs a multiple of "
            f"{need} tokens per rank, this rank holds {local}. Use a length that splits so, or "
            f"bfloat16/float16 (flash attention)")
    out, lse, seed, offset = cp._templated_ring_attention(
        group, _RING_SEQ, aten._scaled_dot_product_efficient_attention.default, q, k, v,
        is_causal=True, attn_bias=None, compute_log_sumexp=True, dropout_p=0.0, scale=scale)
    return out, lse, dict(philox_seed=seed, philox_offset=offset)


def _ring_backward(kernel: str, group: Any, grad: torch.Tensor, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   scale: float | None, extra: dict[str, Any]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``_ring_forward``'s attention."""
    from memoplan.runtime.ring import engine

    cp, aten = engine(), torch.ops.aten
    if kernel == "cpu":
        op, name = aten._scaled_dot_product_flash_attention_for_cpu_backward.default, "grad_out"
    elif kernel == "flash":
        op, name = aten._scaled_dot_product_flash_attention_backward.default, "grad_out"
    else:
        op, name = aten._scaled_dot_product_efficient_attention_backward.default, "grad_out_"
        extra = dict(extra, attn_bias=None, grad_input_mask=[True, True, True, False])
    return cp._templated_ring_attention_backward(
        group, _RING_SEQ, op, grad_out=grad, grad_out_name=name, query=q, key=k, value=v,
        out=out, logsumexp=lse, is_causal=True, dropout_p=0.0, scale=scale, **extra)[:3]


class _TorchRing(torch.autograd.Function):
    """Causal attention over the ranks of ``group`` through torch's own ring engine, around
    the kernel ``F.scaled_dot_product_attention`` would run on those tensors (see
    ``ring_sdpa``)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, group, load_balance):
        from memoplan.runtime.ring import engine

        kernel = _ring_kernel(q)
        with _load_balanced(engine(), load_balance):
            out, lse, extra = _ring_forward(kernel, group, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group, ctx.load_balance = scale, group, load_balance
        ctx.kernel, ctx.extra = kernel, extra
        return out

    @staticmethod
    def backward(ctx, grad):
        from memoplan.runtime.ring import engine

        q, k, v, out, lse = ctx.saved_tensors
        with _load_balanced(engine(), ctx.load_balance):
            dq, dk, dv = _ring_backward(ctx.kernel, ctx.group, grad, q, k, v, out, lse,
                                        ctx.scale, ctx.extra)
        return dq, dk, dv, None, None, None


def ring_sdpa(group, load_balance: bool = True):
    """A drop-in for ``F.scaled_dot_product_attention`` (causal, no mask or dropout) that runs
    over the context-parallel ranks of ``group`` through torch's ring engine
    (``_templated_ring_attention`` and its backward): what
    ``torch.distributed.tensor.experimental.context_parallel``'s dispatcher runs, without its
    sharding of the inputs. Each rank passes its own tokens, in the load-balanced (head-tail)
    order when ``load_balance`` (rank r of cp holds chunks r and 2cp-1-r of 2cp), else in
    order (chunk r of cp). On a CPU each ring step runs CPU flash attention (the dispatcher has
    no CPU strategy); on a GPU flash attention for float16/bfloat16 and memory-efficient
    attention for float32, as ``F.scaled_dot_product_attention`` picks them. The reference
    that memoplan's context-parallel runs are compared with."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        if attn_mask is not None or dropout_p or not is_causal or enable_gqa:
            raise RuntimeError("ring_sdpa: causal attention without mask, dropout or GQA only")
        return _TorchRing.apply(q, k, v, scale, group, load_balance)
    return sdpa
