"""Llama-style decoder-only transformer, written from scratch in plain torch.

A memoplan *model file*: it defines ``build_model()``, ``example_inputs(seq_len)``,
a ``PRESETS`` dict and a per-preset ``DTYPE``. The repeated layer is ``LlamaBlock``
(``layer(x, cos, sin)``); the profiler finds it by itself, so ``LAYER`` is not set.

Architecture: token embedding -> N x LlamaBlock -> RMSNorm -> LM head (untied, no biases).
LlamaBlock: RMSNorm -> grouped-query attention with RoPE (SDPA, causal) -> residual,
RMSNorm -> SwiGLU FFN -> residual. The RoPE cos/sin for positions ``arange(S)`` are
computed once per forward in ``Llama.forward`` and passed to every layer.

Profile it with::

    memoplan profile examples/llama/model.py                      # preset "tiny", float32
    MEMOPLAN_PRESET=7b memoplan profile examples/llama/model.py   # Llama-2-7B sizes, bfloat16
    MEMOPLAN_PRESET=70b memoplan profile examples/llama/model.py  # Llama-3-70B sizes (GQA), bf16

The preset is read from the environment variable ``MEMOPLAN_PRESET`` (default "tiny")
each time ``build_model()`` or ``example_inputs()`` is called, not at import time.

``loss_fn(logits)`` is next-token cross entropy computed a chunk of tokens at a time, as
long-context training does: a plain ``F.cross_entropy(logits.float(), ...)`` holds several
float32 copies of the logits at once (at 128K tokens per GPU and a 32000-token vocabulary, each
is 16 GiB), this holds the logits, their gradient and one chunk. The labels stand in for the
shifted tokens: random tokens from a fixed seed, so every run (and every rank) sees the same.
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Config:
    vocab_size: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    n_layers: int
    max_seq_len: int
    dtype: torch.dtype
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6


PRESETS = {
    "tiny": Config(vocab_size=256, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=176,
                   n_layers=4, max_seq_len=1 << 20, dtype=torch.float32),
    "7b": Config(vocab_size=32000, dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                 n_layers=32, max_seq_len=1 << 20, dtype=torch.bfloat16),
    "70b": Config(vocab_size=128256, dim=8192, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                  n_layers=80, max_seq_len=1 << 20, dtype=torch.bfloat16, rope_theta=500000.0,
                  norm_eps=1e-5),
}


def preset_name() -> str:
    name = os.environ.get("MEMOPLAN_PRESET", "tiny")
    if name not in PRESETS:
        raise ValueError(
            f"unknown MEMOPLAN_PRESET {name!r} for {__file__}; known presets: {sorted(PRESETS)}"
        )
    return name


def config() -> Config:
    """The preset's sizes; ``MEMOPLAN_LAYERS`` (optional) overrides its layer count, so a short
    stack of 7B-shaped layers builds in seconds (benchmarks)."""
    cfg = PRESETS[preset_name()]
    layers = os.environ.get("MEMOPLAN_LAYERS")
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            raise ValueError(f"MEMOPLAN_LAYERS must be a positive whole number, not {layers!r}")
        cfg = dataclasses.replace(cfg, n_layers=int(layers))
    return cfg


def __getattr__(name):
    # Module-level ``DTYPE``: the dtype of the preset chosen *now* (tiny: float32, 7b: bfloat16).
    if name == "DTYPE":
        return config().dtype
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # As in Llama: normalise in float32, cast back, then scale.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype, positions=None):
    """cos, sin of shape (seq_len, head_dim) for positions 0..seq_len-1, or ``positions``
    (computed in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = (torch.arange(seq_len, device=device, dtype=torch.float32) if positions is None
           else positions.to(device=device, dtype=torch.float32))
    freqs = torch.outer(pos, inv_freq)          # (S, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)     # (S, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, H, S, head_dim); cos/sin: (S, head_dim), broadcast over B and H.
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: share each k/v head
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, head_dim)
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self.o_proj(y)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """One decoder layer. Called as ``layer(x, cos, sin)``; x: (B, S, dim), cos/sin: (S, head_dim)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.ffn(self.ffn_norm(x))
        return x


class Llama(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens, positions=None):
        """tokens: (B, S) int64 -> logits (B, S, vocab_size). ``positions`` (S,): the tokens'
        positions in the sequence, 0..S-1 by default; under context parallelism a rank passes
        those of the tokens it holds."""
        S = tokens.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(tokens)
        cos, sin = rope_cos_sin(S, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta,
                                x.device, x.dtype, positions)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Cheap in-place init: normal(0, std) for linear/embedding weights, ones for norms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


# ----------------------------------------------------------------------------- memoplan API


def build_model() -> nn.Module:
    name = preset_name()
    cfg = config()
    torch.manual_seed(0)
    if name == "tiny":
        model = Llama(cfg).to(cfg.dtype)
    else:
        # Large presets: build shapes only on the meta device, cast there (free), then allocate
        # uninitialised CPU storage in the final dtype and fill it in place. This avoids the
        # slow default init and a float32 copy (7b: ~13.5 GB in bf16 instead of ~27 GB).
        with torch.device("meta"):
            model = Llama(cfg)
        model = model.to(cfg.dtype).to_empty(device="cpu")
    init_weights(model)
    return model.train()


LOSS_CHUNK = 4096  # tokens per chunk of the cross entropy (float32: 4096 x vocab x 4 bytes)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of ``logits`` (N, V) against ``labels`` (N,), in float32, ``chunk``
    rows at a time: forward keeps each row's log-sum-exp (N floats), backward rebuilds the
    softmax a chunk at a time and writes the gradient in the logits' dtype. Equal to
    ``F.cross_entropy(logits.float(), labels)`` and its gradient (cast to the logits' dtype)."""

    @staticmethod
    def forward(ctx, logits, labels, chunk):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for i in range(0, n, chunk):
            part = logits[i:i + chunk].float()
            lse[i:i + chunk] = torch.logsumexp(part, dim=-1)
            picked = part.gather(1, labels[i:i + chunk, None]).squeeze(1)
            total = total + (lse[i:i + chunk] - picked).sum()
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk = chunk
        return total / n

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        n, chunk = logits.shape[0], ctx.chunk
        out = torch.empty_like(logits)
        for i in range(0, n, chunk):
            p = torch.exp(logits[i:i + chunk].float() - lse[i:i + chunk, None])
            p.scatter_add_(1, labels[i:i + chunk, None],
                           torch.full_like(p[:, :1], -1.0))  # softmax - one-hot
            out[i:i + chunk] = (p * (grad / n)).to(out.dtype)
        return out, None, None


def loss_fn(logits):
    """Next-token cross entropy in chunks (module docstring); labels from a fixed seed."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(vocab, (flat.shape[0],), generator=g).to(logits.device)
    return ChunkedCrossEntropy.apply(flat, labels, LOSS_CHUNK)


def example_inputs(seq_len: int):
    cfg = config()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (1, seq_len), generator=g)
    return (tokens,)
