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


class _TorchRing(torch.autograd.Function):
    """Causal attention over the ranks of ``group`` through torch's own ring engine, around the
    CPU flash kernel (see ``ring_sdpa``)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, group):
        from memoplan.runtime.ring import engine

        cp = engine()
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        saved = cp._cp_options.enable_load_balance
        cp._cp_options.enable_load_balance = True
        try:
            out, lse = cp._templated_ring_attention(group, 2, op, q, k, v, is_causal=True,
                                                    scale=scale)[:2]
        finally:
            cp._cp_options.enable_load_balance = saved
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group = scale, group
        return out

    @staticmethod
    def backward(ctx, grad):
        from memoplan.runtime.ring import engine

        cp = engine()
        q, k, v, out, lse = ctx.saved_tensors
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
        saved = cp._cp_options.enable_load_balance
        cp._cp_options.enable_load_balance = True
        try:
            dq, dk, dv = cp._templated_ring_attention_backward(
                ctx.group, 2, op, grad_out=grad, grad_out_name="grad_out", query=q, key=k,
                value=v, out=out, logsumexp=lse, is_causal=True, dropout_p=0.0,
                scale=ctx.scale)[:3]
        finally:
            cp._cp_options.enable_load_balance = saved
        return dq, dk, dv, None, None


def ring_sdpa(group):
    """A drop-in for ``F.scaled_dot_product_attention`` (causal, no mask or dropout) that runs
    over the context-parallel ranks of ``group`` through torch's ring engine, on the CPU:
    what ``torch.distributed.tensor.experimental.context_parallel`` does on a GPU, whose
    dispatcher has no CPU strategy. Each rank passes its tokens in the load-balanced
    (head-tail) order. The reference that memoplan's context-parallel runs are compared with."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        if attn_mask is not None or dropout_p or not is_causal or enable_gqa:
            raise RuntimeError("ring_sdpa: causal attention without mask, dropout or GQA only")
        return _TorchRing.apply(q, k, v, scale, group)
    return sdpa
