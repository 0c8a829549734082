"""A small decoder whose layers draw random numbers functionally (dropout written with
``rand_like``, which stays one out-of-place op when traced, as CUDA's ``native_dropout`` does):
a re-run of a layer's forward in backward must draw the same mask as the forward did."""

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, LAYERS, VOCAB, P = 32, 3, 64, 0.25


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        h = F.gelu(self.up(self.norm(x)))
        keep = (torch.rand_like(h) > P).to(h.dtype)
        return x + self.down(h * keep / (1 - P))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build_model():
    torch.manual_seed(0)
    return Decoder().train()


def example_inputs(seq_len):
    return (torch.randint(VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0)),)
