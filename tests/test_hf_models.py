"""Tiny Hugging Face models in their default configurations (KV cache on, dropout on, in-place
ops inside library code), and a decoder made only of torch.nn parts: each profiles, solves
with alpha 0.5, and trains two steps at 512 and 509 tokens with the loss and gradients of plain
training (fp32, same seed before each step). Under torch.no_grad() or eval() a model under a
plan behaves as before: ``generate()`` gives the same tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from memoplan.errors import MemoplanError
from memoplan.hardware import get_hardware
from memoplan.runtime import apply
from memoplan.solve import SolveConfig, solve_plan
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.loader import load_model_file

pytest.importorskip("transformers", reason="transformers is a test dependency")

MODELS = Path(__file__).parent / "models"
HF = MODELS / "hf_default.py"
# each case takes 3-15 s on 2 cores, all of them about a minute and a half
ARCHS = ["llama", "qwen3", "mistral", "gemma2", "phi3", "gpt_neox", "olmo2", "gpt2", "bert",
         "falcon", "t5", "mixtral", "qwen2_moe"]


def _plan(path: Path, alpha: float):
    prof = profile_model(ProfileConfig(model_file=path, seq=128))
    plan = solve_plan(prof, SolveConfig(seq=8192, hardware=get_hardware("h200"), time_limit=2.0,
                                        keep_last=1, alpha=alpha))
    assert all(l.alpha == alpha for l in plan.layers if l.mode == "offload")
    return prof, plan


def _train_and_compare(path: Path, *, alpha: float = 0.5, lengths=(512, 509)):
    prof, plan = _plan(path, alpha)
    mf = load_model_file(path)
    model = mf.build_model()
    ref = copy.deepcopy(model)
    apply(model, plan, debug_poison=True)
    for step, seq in enumerate(lengths):
        losses, grads = [], []
        for m in (model, ref):
            m.zero_grad()
            inputs = mf.example_inputs(seq)
            torch.manual_seed(1000 + step)
            loss = mf.loss_fn(m(**inputs) if isinstance(inputs, dict) else m(*inputs))
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7,
                                       msg=name)
    runner = model._memoplan_runner
    assert runner.calls == len(lengths) * len(plan.layers)
    assert runner.recomputed_tokens > 0  # dropped tokens really were rebuilt
    return prof, plan, model, mf


@pytest.fixture
def arch(monkeypatch):
    def set_arch(name: str) -> Path:
        monkeypatch.setenv("MEMOPLAN_HF_ARCH", name)
        return HF
    return set_arch


@pytest.mark.parametrize("name", ARCHS)
def test_default_config_trains_like_plain_training(arch, name):
    _train_and_compare(arch(name))


def test_a_decoder_of_torch_nn_parts():
    """nn.RMSNorm (in-place add_ in its decomposition), nn.Dropout and SDPA with dropout."""
    _train_and_compare(MODELS / "nn_decoder.py")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_and_eval_are_untouched(arch, name):
    """generate() (no grad, KV cache) gives the same tokens after apply as before, also after
    training steps under the plan; eval() under grad runs the layers as they were."""
    path = arch(name)
    _, plan = _plan(path, 0.5)
    mf = load_model_file(path)
    model = mf.build_model()
    prompt = mf.example_inputs(12)["input_ids"]

    def generate(m):
        m.eval()
        out = m.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        m.train()
        return out

    before = generate(model)
    ref = copy.deepcopy(model)
    apply(model, plan)
    with pytest.warns(UserWarning, match="key/value cache"):
        mf.loss_fn(model(**mf.example_inputs(64))).backward()
    mf.loss_fn(ref(**mf.example_inputs(64))).backward()
    assert torch.equal(generate(model), before)
    model.eval()
    ref.eval()
    calls = model._memoplan_runner.calls
    with pytest.warns(UserWarning, match="eval.. mode run their original forward"):
        a = model(**mf.example_inputs(32))
    b = ref(**mf.example_inputs(32))
    assert model._memoplan_runner.calls == calls  # eval: the original forward ran
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert a.past_key_values.get_seq_length() == b.past_key_values.get_seq_length() == 32


PASS_THROUGH = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 32)

    def forward(self, x, bias):
        q, k, v = self.qkv(x).view(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x + self.out(a.transpose(1, 2).reshape(x.shape)), bias{extra}


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, tokens):
        x = self.embed(tokens)
        s = tokens.shape[1]
        bias = torch.zeros(s, s).masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -1e9)
        for layer in self.layers:
            x, bias = layer(x, bias)[:2]  # as T5's blocks hand on their attention bias
        return x


def build_model():
    torch.manual_seed(0)
    return Stack()


def example_inputs(seq_len):
    return (torch.randint(64, (1, seq_len), generator=torch.Generator().manual_seed(0)),)


def loss_fn(out):
    return out.pow(2).mean()
"""


def test_a_layer_that_hands_on_an_argument(write_model):
    """A layer that returns one of its arguments needing no gradient (T5's position bias) gets
    that very tensor back, not the fake one of the first-call trace."""
    _train_and_compare(write_model(PASS_THROUGH.format(extra="")), lengths=(96, 93))


def test_a_layer_output_that_needs_no_gradient_is_refused(write_model):
    path = write_model(PASS_THROUGH.format(extra=", bias.exp()"))
    _, plan = _plan(path, 0.5)
    mf = load_model_file(path)
    model = apply(mf.build_model(), plan)
    with pytest.raises(MemoplanError, match=r"returns a tensor that needs no gradient.*output #2"):
        model(*mf.example_inputs(64))


def test_keyword_arguments_in_another_order_and_a_block_outside_the_stack():
    """A layer program binds tensors by position: a call with its keywords in another order
    gets a program of its own (the same one would swap scale and shift). The block outside the
    ModuleList is not planned, as the profile says, and runs as usual."""
    path = MODELS / "keyword_decoder.py"
    prof, plan, model, _ = _train_and_compare(path, lengths=(96, 93))
    assert prof.model.num_layers == len(plan.layers) == 3
    assert any("held in no nn.ModuleList" in n for n in prof.notes)
