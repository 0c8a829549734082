"""A decoder whose layers take keyword tensors of one shape, passed in a different order on
alternate layers (layer(x, scale=s, shift=t), then layer(x, shift=t, scale=s)), and that holds
one more block of the same class outside its ModuleList (run as usual, not planned)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 32)

    def forward(self, x, *, scale, shift):
        q, k, v = self.qkv(x).view(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(a.transpose(1, 2).reshape(x.shape)) * scale + shift


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.final = Block()  # identical, but no member of the stack

    def forward(self, tokens):
        x = self.embed(tokens)
        scale = torch.full((1, tokens.shape[1], 1), 2.0)
        shift = torch.full((1, tokens.shape[1], 1), 0.5)
        for i, layer in enumerate(self.layers):
            # same tensors, keyword order differs between calls
            x = layer(x, scale=scale, shift=shift) if i % 2 == 0 else layer(x, shift=shift,
                                                                          scale=scale)
        return self.final(x, scale=scale, shift=shift)


def build_model():
    torch.manual_seed(0)
    return Stack()


def example_inputs(seq_len):
    return (torch.randint(64, (1, seq_len), generator=torch.Generator().manual_seed(0)),)


def loss_fn(out):
    return out.pow(2).mean()
