"""The profile stage: classification on hand-built layers, the saved-bytes count against an
independent count by saved-tensor hooks, size laws, token-wise recomputation, and bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLES
from memoplan.errors import MemoplanError
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.classify import classify_forward, seq_axes, token_segments
from memoplan.trace.graph import trace_layer
from memoplan.trace.laws import fit_law
from memoplan.trace.layers import capture_layer_call, find_repeated_layer
from memoplan.trace.loader import build, load_model_file
from memoplan.trace.recompute import recompute_segment

STACK = """
import torch
from torch import nn

class Stack(nn.Module):
    def __init__(self, make, n=3):
        super().__init__()
        self.layers = nn.ModuleList(make() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

def example_inputs(seq_len):
    return (torch.randn(1, seq_len, 8, generator=torch.Generator().manual_seed(0)),)
"""

MLP = STACK + """
class MLP(nn.Module):  # h 8 -> 16 -> 8, relu, residual
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))

def build_model():
    return Stack(MLP)
"""

CUMSUM = STACK + """
class Cum(nn.Module):  # a token-mixing op whose output is saved
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return torch.cumsum(x, dim=1) * self.w

def build_model():
    return Stack(Cum)
"""

HIDDEN_MIX = STACK + """
class Hidden(nn.Module):  # sigmoid of a mixing output that is NOT saved
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return torch.sigmoid(torch.cumsum(x, dim=1)) * self.w

def build_model():
    return Stack(Hidden)
"""


def _profile(path: Path, seq: int = 64, **kw) -> object:
    return profile_model(ProfileConfig(model_file=path, seq=seq, **kw))


def _saved(p) -> dict[str, tuple[str, bool, float]]:
    return {t.producer: (t.kind, t.token_wise, t.bytes_per_token) for t in p.layer.saved}


# ---- classification on hand-built layers (answers computed by hand in the comments) ----------

def test_mlp_layer_saves_input_and_relu_output(write_model):
    # eager autograd: mm(x, W1^T) saves x; relu saves its result; mm(r, W2^T) saves r.
    # x: 8 fp32 = 32 B/token (input); relu out: 16 fp32 = 64 B/token (token-wise other).
    p = _profile(write_model(MLP))
    assert p.model.layer_class == "MLP" and p.model.num_layers == 3
    assert p.model.param_bytes_per_layer == (8 * 16 * 2) * 4
    saved = _saved(p)
    assert saved == {"input": ("input", False, 32.0),
                     "aten.relu.default": ("other", True, 64.0)}
    assert p.layer.mixing_ops == ()
    assert len(p.layer.segments) == 1
    assert p.layer.flops_forward.mixing == 0
    # two matmuls of 8x16 per token, 2 FLOPs per multiply-add
    assert p.layer.flops_forward.token_wise_law.per_token == 2 * 2 * 8 * 16


def test_cumsum_is_a_mixing_op_and_its_saved_output_a_mixing_output(write_model):
    # mul saves cumsum's output (for grad of w); cumsum's backward needs nothing; x is not saved
    # by autograd, but the profile keeps the layer input as the source of recomputation.
    p = _profile(write_model(CUMSUM))
    assert _saved(p) == {"input": ("input", False, 32.0),
                         "aten.cumsum.default": ("mixing_output", False, 32.0)}
    assert [t.autograd_saved for t in p.layer.saved] == [False, True]
    assert p.layer.mixing_ops == ("aten.cumsum.default",)


def test_tensor_behind_an_unsaved_mixing_output_is_not_token_wise(write_model):
    # sigmoid saves its result s; s depends on cumsum(x), which is not kept, so s cannot be
    # recomputed from kept tensors for a subset of tokens.
    p = _profile(write_model(HIDDEN_MIX))
    assert _saved(p) == {"input": ("input", False, 32.0),
                         "aten.sigmoid.default": ("other", False, 32.0)}


def test_requests_balance_and_peaks(write_model):
    p = _profile(write_model(MLP))
    L = p.layer
    roles = {t.id: t.role for t in L.tensors}
    mallocs = {i for op, i, _ in L.requests_forward if op == "malloc"}
    freed_fwd = {i for op, i, _ in L.requests_forward if op == "free"}
    freed_bwd = {i for op, i, _ in L.requests_backward if op == "free"}
    assert {i for i in mallocs if roles[i] == "transient"} == freed_fwd
    assert {i for i in mallocs if roles[i] == "skeletal"} <= freed_bwd
    assert not any(roles[i] in ("output", "grad") for i in freed_fwd | freed_bwd)
    saved_other = sum(t.bytes for t in L.saved if t.kind == "other")
    assert sum(t.bytes for t in L.tensors if t.role == "skeletal") == saved_other
    assert L.peak_forward >= saved_other


# ---- the saved-bytes count against saved-tensor hooks -----------------------------------------

def _hook_saved_bytes(model_file: Path, layer_class: str, seq_len: int) -> int:
    """Independent count: run the layer eagerly and add up the distinct storages that autograd
    packs, minus parameters, buffers and the layer's extra (shared) arguments."""
    spec = importlib.util.spec_from_file_location(f"hookcheck_{abs(hash(model_file))}", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build_model().train()
    layer = next(m for m in model.modules() if type(m).__name__ == layer_class)
    call = {}

    def grab(module, args, kwargs):
        call["a"] = (args, kwargs)
        raise KeyboardInterrupt  # stop the model's run here

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    inputs = mod.example_inputs(seq_len)
    try:
        model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    except KeyboardInterrupt:
        pass
    handle.remove()
    args, kwargs = call["a"]
    hidden = args[0] if args else kwargs["hidden_states"]
    hidden = hidden.detach().requires_grad_()
    args = (hidden, *args[1:]) if args else args
    kwargs = kwargs if args else {**kwargs, "hidden_states": hidden}
    extra = [t for t in torch.utils._pytree.tree_leaves((args[1:], kwargs))
             if isinstance(t, torch.Tensor) and t is not hidden]
    skip = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers(), *extra]}
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(*args, **kwargs)
    return sum(t.untyped_storage().nbytes() for t in seen.values())


@pytest.mark.parametrize("example", ["llama", "gpt", "hf_llama"])
def test_saved_bytes_per_token_match_saved_tensor_hooks(example):
    if example == "hf_llama":
        pytest.importorskip("transformers", reason="transformers is a test dependency")
    path = EXAMPLES / example / "model.py"
    p = _profile(path, seq=128)
    ours = sum(t.bytes_per_token for t in p.layer.saved if t.kind != "shared" and t.autograd_saved)
    a, b = 96, 160
    hooks = (_hook_saved_bytes(path, p.model.layer_class, b)
             - _hook_saved_bytes(path, p.model.layer_class, a)) / (b - a)
    assert ours == pytest.approx(hooks, rel=0.02)
    kinds = {t.kind for t in p.layer.saved}
    assert {"input", "mixing_output", "other"} <= kinds
    # extrapolation: the laws predict the hook count at a length that was never profiled
    at = 200
    predicted = sum(t.law.bytes_at(at) for t in p.layer.saved
                    if t.kind != "shared" and t.autograd_saved)
    assert predicted == pytest.approx(_hook_saved_bytes(path, p.model.layer_class, at), rel=0.02)


def test_attention_is_the_mixing_op_of_llama_and_flops_split():
    p = _profile(EXAMPLES / "llama" / "model.py", seq=128)
    assert len(p.layer.mixing_ops) == 1 and "scaled_dot_product" in p.layer.mixing_ops[0]
    f = p.layer.flops_forward
    h, heads = 64, 4
    # causal attention: 2 * S^2 * h FLOPs (two matmuls of S x S x head_dim per head, halved)
    assert f.mixing_law.coeffs[2] == pytest.approx(2 * h)
    assert f.mixing_law.degree == 2 and f.token_wise_law.degree == 1
    assert p.time_source == "estimated" and p.layer.time_forward_s > 0
    assert {t.kind for t in p.layer.saved if t.kind == "shared"} == {"shared"}  # cos/sin tables
    del heads


# ---- token-wise property: recompute a random token subset ------------------------------------

@pytest.mark.parametrize("example", ["llama", "gpt"])
@pytest.mark.parametrize("seed", [0, 1])
def test_recomputing_a_token_subset_equals_that_slice(example, seed):
    mf = load_model_file(EXAMPLES / example / "model.py")
    model = build(mf)
    layer = find_repeated_layer(model).first
    traces = []
    for s in (72, 100):
        args, kwargs = capture_layer_call(mf, model, layer, s)
        traces.append(trace_layer(layer, args, kwargs, seq_len=s, layer_name="layer"))
    axes = seq_axes(traces)
    classes = classify_forward(traces[0], axes)
    segments, _ = token_segments(traces[0], classes)
    tr = traces[-1]
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    for seg in segments:
        tokens = torch.randperm(100, generator=gen)[: 1 + seed * 30 + 20].sort().values
        values = recompute_segment(tr, list(seg.nodes), axes, tokens)
        for name, v in values.items():
            ax = axes[name]
            if isinstance(v, torch.Tensor) and len(ax) == 1 and len(ax[0]) == 1:
                ref = tr.real[name].index_select(ax[0][0], tokens)
                torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)
                checked += 1
    assert checked > 10


# ---- size laws -------------------------------------------------------------------------------

def test_fit_law_linear_quadratic_and_inexact():
    lens = [32, 64, 96, 128]
    assert fit_law(lens, [10 + 4 * s for s in lens]).coeffs == (10.0, 4.0)
    quad = fit_law(lens, [4 * s * s + 2 * s for s in lens])
    assert quad.exact and quad.degree == 2 and quad.coeffs[2] == 4.0
    assert fit_law(lens, [7, 7, 7, 7]).coeffs == (7.0,)
    bad = fit_law(lens, [2**s for s in (1, 2, 3, 9)])
    assert not bad.exact and bad.max_rel_error > 0.01
    assert quad.bytes_at(1 << 20) == 4 * (1 << 40) + 2 * (1 << 20)


# ---- the CLI and bad input -------------------------------------------------------------------

def test_cli_profile_writes_the_documented_fields(cli, tmp_path):
    out = tmp_path / "p.json"
    r = cli("profile", EXAMPLES / "llama" / "model.py", "--seq", "128", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["schema"] == "memoplan.profile/1"
    assert d["model"]["layer_class"] == "LlamaBlock" and d["model"]["num_layers"] == 4
    assert d["model"]["param_bytes_per_layer"] > 0
    assert {"name", "kind", "token_wise", "bytes_per_token", "bytes"} <= set(d["layer"]["saved"][0])
    assert d["layer"]["requests"]["forward"][0][0] == "malloc"
    assert {"token_wise", "mixing"} <= set(d["layer"]["flops"]["forward"])
    assert d["time_source"] == "estimated"


BAD = {
    "import_error": ("import torch\nraise RuntimeError('boom in user code')\n", "boom in user code"),
    "no_build": ("def example_inputs(seq_len):\n    return ()\n", "defines no function 'build_model'"),
    "no_repeat": ("import torch\n"
                  "def build_model():\n    return torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
                  "def example_inputs(seq_len):\n    return (torch.randn(1, seq_len, 8),)\n",
                  "--layer"),
    "untraceable": (STACK + "class Bad(torch.nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n"
                    "        self.w = torch.nn.Parameter(torch.ones(8))\n"
                    "    def forward(self, x):\n        return x * self.w * x.sum().item()\n"
                    "def build_model():\n    return Stack(Bad)\n", "_local_scalar_dense"),
    "bad_inputs": (MLP + "\ndef example_inputs(seq_len):\n    return 3\n", "returned int"),
    # a write into the layer's own intermediate is rewritten out of place; one into a buffer
    # (a replay would apply it twice) or through a view whose base is read again is refused,
    # naming the source line
    "in_place": (STACK + "class InPlace(torch.nn.Module):\n"
                 "    def __init__(self):\n        super().__init__()\n"
                 "        self.w = torch.nn.Parameter(torch.ones(8))\n"
                 "        self.register_buffer('calls', torch.zeros(()))\n"
                 "    def forward(self, x):\n        h = x * self.w\n        h.mul_(2.0)\n"
                 "        self.calls.add_(1)\n        return x + h\n"
                 "def build_model():\n    return Stack(InPlace)\n",
                 "writes in place into the buffer 'calls'"),
    "in_place_view": (STACK + "class InPlace(torch.nn.Module):\n"
                      "    def __init__(self):\n        super().__init__()\n"
                      "        self.w = torch.nn.Parameter(torch.ones(8))\n"
                      "    def forward(self, x):\n        h = x * self.w\n"
                      "        h[:, :1].mul_(2.0)\n        return x + h\n"
                      "def build_model():\n    return Stack(InPlace)\n",
                      "read again afterwards through another alias"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_model_files_exit_2_with_a_clear_message_and_no_output(case, cli, write_model, tmp_path):
    source, expected = BAD[case]
    out = tmp_path / "out.json"
    r = cli("profile", write_model(source), "--seq", "64", "-o", out)
    assert r.exit_code == 2, r.output
    assert expected in r.output
    assert "Traceback" not in r.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.json*"))


def test_missing_file_unknown_layer_and_small_seq(cli, tmp_path, write_model):
    out = tmp_path / "out.json"
    r = cli("profile", tmp_path / "nope.py", "-o", out)
    assert r.exit_code == 2 and "does not exist" in r.output
    mlp = write_model(MLP)
    r = cli("profile", mlp, "--layer", "Nope", "--seq", "64", "-o", out)
    assert r.exit_code == 2 and "no module of class 'Nope'" in r.output and "MLP" in r.output
    r = cli("profile", mlp, "--seq", "8", "-o", out)
    assert r.exit_code == 2 and "too small to fit size laws" in r.output
    r = cli("profile", mlp, "--seq", "lots", "-o", out)
    assert r.exit_code == 2 and "Cannot read the sequence length" in r.output
    assert not out.exists()


def test_layer_override_from_the_model_file(write_model):
    # the MLP's Linears are 3 of 8->16 and 3 of 16->8: only the first kind is grouped, and a
    # note says the others differ
    p = _profile(write_model(MLP + "\nLAYER = 'Linear'\n"))
    assert p.model.layer_class == "Linear" and p.model.num_layers == 3
    assert any("3 other Linear instance(s) differ" in n for n in p.notes)


def test_profile_json_round_trips(write_model):
    from memoplan.ir import Profile

    p = _profile(write_model(MLP))
    assert Profile.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(MemoplanError, match="malformed"):
        Profile.from_json({"schema": "memoplan.profile/1", "layer": {}})
