"""GPT / Megatron-style decoder-only transformer, written from scratch in plain torch.

A memoplan *model file*: it defines ``build_model()``, ``example_inputs(seq_len)``,
a ``PRESETS`` dict and a per-preset ``DTYPE``. The repeated layer is ``GPTBlock``
(``layer(x)``); the profiler finds it by itself, so ``LAYER`` is not set.

Architecture: token embedding + learned position embedding -> N x GPTBlock -> LayerNorm
-> LM head (untied). GPTBlock (pre-LayerNorm): LayerNorm -> fused qkv Linear (with bias)
-> SDPA causal -> out proj -> residual, LayerNorm -> FC1 (4h) -> GeLU (tanh) -> FC2 -> residual.

Profile it with::

    memoplan profile examples/gpt/model.py                      # preset "tiny", float32
    MEMOPLAN_PRESET=7b memoplan profile examples/gpt/model.py   # ~7B parameters, bfloat16

The preset is read from the environment variable ``MEMOPLAN_PRESET`` (default "tiny")
each time ``build_model()`` or ``example_inputs()`` is called, not at import time.
Sequence lengths are limited by the learned position table (``max_pos``: tiny 4096, 7b 8192).
"""

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
    ffn_dim: int
    n_layers: int
    max_pos: int
    dtype: torch.dtype
    norm_eps: float = 1e-5


PRESETS = {
    "tiny": Config(vocab_size=256, dim=64, n_heads=4, ffn_dim=256, n_layers=4,
                   max_pos=4096, dtype=torch.float32),
    "7b": Config(vocab_size=32000, dim=4096, n_heads=32, ffn_dim=16384, n_layers=32,
                 max_pos=8192, dtype=torch.bfloat16),
}


def preset_name() -> str:
    name = os.environ.get("MEMOPLAN_PRESET", "tiny")
    if name not in PRESETS:
        raise ValueError(
            f"unknown MEMOPLAN_PRESET {name!r} for {__file__}; known presets: {sorted(PRESETS)}"
        )
    return name


def config() -> Config:
    return PRESETS[preset_name()]


def __getattr__(name):
    # Module-level ``DTYPE``: the dtype of the preset chosen *now* (tiny: float32, 7b: bfloat16).
    if name == "DTYPE":
        return config().dtype
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- modules


class SelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def forward(self, x):
        B, S, D = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, S, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=True)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=True)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class GPTBlock(nn.Module):
    """One pre-LayerNorm decoder layer. Called as ``layer(x)``; x: (B, S, dim)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_pos, cfg.dim)
        self.layers = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens):
        """tokens: (B, S) int64 -> logits (B, S, vocab_size)."""
        S = tokens.shape[1]
        if S > self.cfg.max_pos:
            raise ValueError(f"sequence length {S} exceeds max_pos {self.cfg.max_pos}")
        pos = torch.arange(S, device=tokens.device)
        x = self.tok_embed(tokens) + self.pos_embed(pos)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Cheap in-place init: normal(0, std) weights, zero biases, LayerNorm weight 1 / bias 0."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


# ----------------------------------------------------------------------------- memoplan API


def build_model() -> nn.Module:
    name = preset_name()
    cfg = PRESETS[name]
    torch.manual_seed(0)
    if name == "tiny":
        model = GPT(cfg).to(cfg.dtype)
    else:
        # Large presets: build shapes only on the meta device, cast there (free), then allocate
        # uninitialised CPU storage in the final dtype and fill it in place (no slow default
        # init, no float32 copy).
        with torch.device("meta"):
            model = GPT(cfg)
        model = model.to(cfg.dtype).to_empty(device="cpu")
    init_weights(model)
    return model.train()


def example_inputs(seq_len: int):
    cfg = config()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.vocab_size, (1, seq_len), generator=g)
    return (tokens,)
