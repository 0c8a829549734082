"""The token-wise probe compares exactly, on inputs laid out as the real ones (issue 11 §6).

A CPU kernel may round differently on a strided view than on a contiguous copy: ``silu`` on
``chunk``'s first half (Phi3's ``gate, up = gate_up.chunk(2, -1)``) runs its vector loop row by
row with a scalar tail, on a contiguous copy over the whole tensor. The probe used to compare
the real output (strided input) with a run on perturbed contiguous clones, saw the last bits of
unperturbed tokens change, and called ``silu`` token-mixing (Phi3 at intermediate size 176: its
704 B/token kept whole instead of recomputed). Both directions are checked here: token-wise ops
on strided chunks are token-wise, and token-mixing ops on the same inputs are still mixing.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.classify import _copy, _perturb, classify_forward, seq_axes
from memoplan.trace.graph import trace_layer

HIDDEN = 64
INNER = 45  # odd: every row of a chunk ends in the kernel's scalar tail (vector widths 8, 16)

SWIGLU = f"""
import torch
import torch.nn.functional as F
from torch import nn

class GatedMLP(nn.Module):  # Phi3's MLP: one fused up projection, chunked into gate and up
    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear({HIDDEN}, 2 * {INNER}, bias=False)
        self.down = nn.Linear({INNER}, {HIDDEN}, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(GatedMLP() for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

def build_model():
    return Stack()

def example_inputs(seq_len):
    return (torch.randn(1, seq_len, {HIDDEN}, generator=torch.Generator().manual_seed(0)),)
"""


def _strided_chunk(seq: int = 37) -> torch.Tensor:
    x = torch.randn(1, seq, 2 * INNER, generator=torch.Generator().manual_seed(0))
    return x.chunk(2, dim=-1)[0]


def test_silu_rounds_differently_on_a_strided_chunk_on_this_cpu():
    """The premise: without it the old probe was right here, and the tests below cannot fail
    on the old code (a CPU build without vector kernels, ATEN_CPU_CAPABILITY=default)."""
    a = _strided_chunk()
    if torch.equal(F.silu(a), F.silu(a.contiguous())):
        pytest.skip(f"silu rounds alike on strided and contiguous inputs on this CPU "
                    f"({torch.backends.cpu.get_cpu_capability()})")


def test_copy_keeps_the_layout_and_owns_its_memory():
    a = _strided_chunk()
    c = _copy(a)
    assert (c.size(), c.stride(), c.storage_offset()) == (a.size(), a.stride(), a.storage_offset())
    assert torch.equal(c, a) and c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    b = torch.randn(1, 37, 2 * INNER).chunk(2, dim=-1)[1]  # second half: storage offset INNER
    assert _copy(b).storage_offset() == INNER and torch.equal(_copy(b), b)
    p = _perturb(a, 1, 5)
    assert p.stride() == a.stride()
    assert torch.equal(p.select(1, 4), a.select(1, 4))
    assert not torch.equal(p.select(1, 5), a.select(1, 5))
    assert torch.equal(F.silu(p).select(1, 4), F.silu(_copy(a)).select(1, 4))


def test_copy_of_an_expanded_view_is_contiguous_so_one_token_changes_alone():
    e = torch.randn(1, 1, 8).expand(1, 37, 8)  # token axis of stride 0: all tokens share memory
    p = _perturb(e, 1, 3)
    assert p.is_contiguous() and torch.equal(p.select(1, 2), e.select(1, 2))
    assert not torch.equal(p.select(1, 3), e.select(1, 3))
    assert _copy(torch.randn(8, 1).expand(8, 5)).is_contiguous()


def test_silu_on_a_strided_chunk_is_token_wise_and_recomputed(tmp_path):
    path = tmp_path / "swiglu.py"
    path.write_text(SWIGLU)
    p = profile_model(ProfileConfig(model_file=path, seq=64))
    saved = {t.producer: (t.kind, t.token_wise, t.bytes_per_token) for t in p.layer.saved}
    assert p.layer.mixing_ops == ()
    # silu saves its input, gate (a view of the fused projection: 2*INNER fp32 per token);
    # mul saves silu's output (INNER fp32) and up (the same projection storage)
    assert saved["aten.silu.default"] == ("other", True, 4.0 * INNER)
    assert saved["aten.mm.default"] == ("other", True, 4.0 * 2 * INNER)
    assert all(tw for kind, tw, _ in saved.values() if kind == "other")


# ---- per-op classes on strided chunks: token-wise ops stay token-wise, mixing ops mixing --------

class OnChunk(nn.Module):
    """Project, chunk into two strided halves a and b, apply ``op(a, b)``, project back."""

    def __init__(self, op):
        super().__init__()
        torch.manual_seed(0)
        self.op = op
        self.up = nn.Linear(HIDDEN, 2 * INNER, bias=False)
        self.down = nn.Linear(INNER, HIDDEN, bias=False)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return x + self.down(self.op(a, b))


def _sdpa(causal: bool):
    def op(a, b):  # one head of INNER channels: q = a, k = v = b
        o = F.scaled_dot_product_attention(a.unsqueeze(1), b.unsqueeze(1), b.unsqueeze(1),
                                           is_causal=causal)
        return o.squeeze(1)
    return op


def _classes(op) -> dict[str, str]:
    """Forward op target -> class (getitems left out) of the layer ``OnChunk(op)``, traced at
    24 and 37 tokens."""
    layer = OnChunk(op)
    traces = []
    for s in (24, 37):
        x = torch.randn(1, s, HIDDEN, generator=torch.Generator().manual_seed(1)).requires_grad_()
        traces.append(trace_layer(layer, (x,), {}, seq_len=s, layer_name="layer"))
    classes = classify_forward(traces[-1], seq_axes(traces))
    return {str(n.target): classes[n.name] for n in traces[-1].forward_nodes
            if n.target is not operator.getitem}  # getitem shares its op's class


TOKEN_WISE = {
    "silu": (lambda a, b: F.silu(a) * b, "aten.silu.default"),
    "gelu": (lambda a, b: F.gelu(a, approximate="tanh") * b, "aten.gelu.default"),
    "sigmoid": (lambda a, b: torch.sigmoid(a) * b, "aten.sigmoid.default"),
    "exp": (lambda a, b: torch.exp(a) + b, "aten.exp.default"),
    "softmax_channels": (lambda a, b: torch.softmax(a, dim=-1) * b, "aten._softmax.default"),
}

MIXING = {
    "cumsum": (lambda a, b: torch.cumsum(a, dim=1) * b, "aten.cumsum.default"),
    "softmax_tokens": (lambda a, b: torch.softmax(a, dim=1) * b, "aten._softmax.default"),
    "flip": (lambda a, b: torch.flip(a, dims=[1]) * b, "aten.flip.default"),
    "roll": (lambda a, b: torch.roll(a, 1, dims=1) * b, "aten.roll.default"),
    "attention": (_sdpa(False), "sdpa"),
    "causal_attention": (_sdpa(True), "sdpa"),
}


@pytest.mark.parametrize("name", sorted(TOKEN_WISE))
def test_token_wise_op_on_a_strided_chunk_is_token(name):
    op, target = TOKEN_WISE[name]
    classes = _classes(op)
    assert classes[target] == "token"
    assert "mixing" not in classes.values(), classes


@pytest.mark.parametrize("name", sorted(MIXING))
def test_token_mixing_op_on_a_strided_chunk_is_mixing(name):
    op, target = MIXING[name]
    classes = _classes(op)
    if target == "sdpa":  # the attention kernel's name differs by backend
        target = next(t for t in classes if "scaled_dot_product" in t)
    assert classes[target] == "mixing"
    # everything else (projections, chunk, mul) is token-wise or token-free
    assert [t for t, c in classes.items() if c == "mixing"] == [target]
