"""Choosing the repeated layer (issue 11 §5): the repeated module that runs attention, not a
more numerous part of it; only instances of one structure grouped; notes on what is left out,
and on a chosen layer without token mixing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.layers import _signature, attention_modules, find_repeated_layer

# ---- a plain-torch encoder-decoder-like model ------------------------------------------------
# blocks: attention and feed-forward held in a ModuleList (as T5's block.layer), the first block's
# attention with an extra bias parameter (as T5's relative attention bias); then a ModuleList of
# more numerous feed-forward-only blocks. FeedForward has 3 + 6 identical instances, Attention
# 2 (+1 with the bias), Block 2 (+1): the old rule (most identical instances) took FeedForward.

MODEL = """
import math
import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, VOCAB = 24, 2, 50
EAGER = {eager}


class Attention(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.out = nn.Linear(DIM, DIM, bias=False)
        self.bias = nn.Parameter(torch.zeros(HEADS)) if bias else None

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, HEADS, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if EAGER:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if self.bias is not None:
                scores = scores + self.bias.view(1, HEADS, 1, 1)
            y = torch.softmax(scores, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, DIM))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(DIM, 2 * DIM, bias=False)
        self.down = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, first=False):
        super().__init__()
        self.layer = nn.ModuleList([Attention(bias=first), FeedForward()])

    def forward(self, x):
        for part in self.layer:
            x = x + part(x)
        return x


class EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(first=i == 0) for i in range(3))
        self.ffns = nn.ModuleList(FeedForward() for _ in range(6))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        for ffn in self.ffns:
            x = x + ffn(x)
        return self.head(x)


def build_model():
    torch.manual_seed(0)
    return EncDec().train()


def example_inputs(seq_len):
    return (torch.randint(VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0)),)
"""


def _load(write_model, eager: bool):
    from memoplan.trace.loader import build, load_model_file

    mf = load_model_file(write_model(MODEL.format(eager=eager)))
    return mf, build(mf)


def _probe(model: nn.Module, ids: torch.Tensor, seq_len: int):
    return lambda: attention_modules(lambda: model(ids), seq_len)


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_the_block_that_runs_attention_beats_more_numerous_ffns(write_model, eager):
    _, model = _load(write_model, eager)
    ids = torch.randint(50, (1, 20))
    found = find_repeated_layer(model, probe=_probe(model, ids, 20))
    assert found.class_name == "Block"
    assert found.instances == (model.blocks[1], model.blocks[2]) and found.path == "blocks.1"
    # the first block has another structure (the bias parameter): not grouped, and said so
    assert any("blocks.0" in n and "not planned" in n for n in found.notes)


def test_attention_modules_sees_sdpa_and_eager_scores_but_not_the_ffn(write_model):
    for eager in (False, True):
        _, model = _load(write_model, eager)
        ran = attention_modules(lambda: model(torch.randint(50, (1, 20))), 20)
        assert id(model.blocks[1].layer[0]) in ran and id(model.blocks[1]) in ran
        assert id(model.blocks[1].layer[1]) not in ran and id(model.ffns[0]) not in ran


def test_override_groups_only_instances_of_one_structure(write_model):
    _, model = _load(write_model, False)
    found = find_repeated_layer(model, "Block")
    assert found.instances == (model.blocks[1], model.blocks[2])
    assert len({_signature(m) for m in found.instances}) == 1
    assert any("1 other Block instance" in n and "blocks.0" in n for n in found.notes)
    ffn = find_repeated_layer(model, "FeedForward")  # all nine identical: all taken, no note
    assert len(ffn.instances) == 9 and ffn.notes == ()


def test_profile_plans_the_block_and_says_what_it_left_out(write_model):
    path = write_model(MODEL.format(eager=False))
    p = profile_model(ProfileConfig(model_file=path, seq=64))
    assert p.model.layer_class == "Block" and p.model.num_layers == 2
    assert p.model.layer_path == "blocks.1"
    assert p.layer.mixing_ops
    assert any("blocks.0" in n for n in p.notes)
    assert not any("no token-mixing op" in n for n in p.notes)


def test_a_chosen_layer_without_token_mixing_gets_a_note(write_model):
    path = write_model(MODEL.format(eager=False) + "\nLAYER = 'FeedForward'\n")
    p = profile_model(ProfileConfig(model_file=path, seq=64))
    assert p.model.layer_class == "FeedForward" and p.layer.mixing_ops == ()
    note = next(n for n in p.notes if "no token-mixing op" in n)
    assert "FeedForward" in note and "--layer" in note


# ---- T5 (transformers) ---------------------------------------------------------------------

def _t5():
    tf = pytest.importorskip("transformers")
    cfg = tf.AutoConfig.for_model("t5", vocab_size=256, d_model=64, d_kv=16, d_ff=128,
                                  num_layers=3, num_heads=4)
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(cfg).train()


def _t5_probe(model: nn.Module):
    ids = torch.randint(256, (1, 24))
    return lambda: attention_modules(
        lambda: model(input_ids=ids, decoder_input_ids=ids), 24)


def test_t5_plans_one_stack_of_t5blocks_and_says_which():
    model = _t5()
    found = find_repeated_layer(model, probe=_t5_probe(model))
    enc = model.encoder.block
    assert found.class_name == "T5Block"  # the old rule took T5LayerFF (6 instances, no attention)
    # encoder blocks 1-2 and decoder blocks 1-2 both qualify: the first in the model is planned
    assert found.instances == (enc[1], enc[2]) and found.path == "encoder.block.1"
    planned, left = found.notes
    assert "planning T5Block x2 (encoder.block.1, encoder.block.2)" in planned
    assert "not planned (they run as usual): T5Block x2 (decoder.block.1, decoder.block.2)" \
        in planned
    assert "--layer" in planned
    assert left.startswith("4 other T5Block") and "encoder.block.0, decoder.block.0" in left


def test_t5_layer_override_never_mixes_structures():
    model = _t5()
    found = find_repeated_layer(model, "T5Block")
    assert found.instances == (model.encoder.block[1], model.encoder.block[2])
    assert len({_signature(m) for m in found.instances}) == 1
    assert any(n.startswith("4 other T5Block") for n in found.notes)
