"""A small bf16 decoder whose attention refuses float32, as CUDA's flash kernel does.

A memoplan model file (``build_model()``, ``example_inputs(seq_len)``) for the tests: the
attention is ``memoplan.testing.attention``, a custom op that raises on float32 inputs, so a
CPU run shows whether profiling or the runtime ever runs attention upcast to float32.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from memoplan.testing import attention

DIM, HEADS, FFN, LAYERS, VOCAB = 64, 4, 128, 3, 128
DTYPE = torch.bfloat16
# attention dropout, as flash attention runs it (a seed and offset saved for backward)
DROPOUT = float(os.environ.get("MEMOPLAN_FLASH_DROPOUT", "0"))


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(DIM))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = Norm(), Norm()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.o = nn.Linear(DIM, DIM, bias=False)
        self.up = nn.Linear(DIM, 2 * FFN, bias=False)
        self.down = nn.Linear(FFN, DIM, bias=False)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, S, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, is_causal=True, dropout_p=DROPOUT if self.training else 0.0).transpose(1, 2).reshape(B, S, DIM)
        x = x + self.o(y)
        gate, up = self.up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = Norm()
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def build_model():
    torch.manual_seed(0)
    return Decoder().to(DTYPE).train()


def example_inputs(seq_len):
    return (torch.randint(VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0)),)


def loss_fn(logits):
    return F.cross_entropy(logits.float().flatten(0, 1), torch.zeros(logits.shape[1], dtype=torch.long))
