"""The stack measured on the H200 (``../shared/reference/h200_baselines.py``), as a model file.

Two Llama-7B-shaped decoder layers exactly as that script builds them: h 4096, 32 heads,
fused qkv and gate/up Linears without bias, ``nn.RMSNorm``, SDPA flash attention (causal),
SwiGLU FFN 11008, no RoPE, bf16, batch 1, fed random hidden states; the loss is
``y.float().square().mean()``. ``tests/test_cost_model.py`` profiles it and compares the cost
model's seconds per layer with the measured table (``h200-baselines.md``).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, NH, FF, LAYERS = 4096, 32, 11008, 2
DTYPE = torch.bfloat16
LAYER = "Layer"


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(H, 3 * H, bias=False)
        self.o = nn.Linear(H, H, bias=False)
        self.gu = nn.Linear(H, 2 * FF, bias=False)
        self.d = nn.Linear(FF, H, bias=False)
        self.n1 = nn.RMSNorm(H)
        self.n2 = nn.RMSNorm(H)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, S, 3, NH, H // NH).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, S, H))
        g, u = self.gu(self.n2(x)).chunk(2, dim=-1)
        return x + self.d(F.silu(g) * u)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build_model():
    torch.manual_seed(0)
    return Stack().to(DTYPE).train()


def example_inputs(seq_len):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, seq_len, H, generator=g).to(DTYPE).requires_grad_(),)


def loss_fn(y):
    return y.float().square().mean()
