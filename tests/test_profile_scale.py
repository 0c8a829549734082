"""Profiling at any model size: the model is built with its parameters on the meta device and
only the profiled layer and what runs before it get real (random) values, so memory does not
grow with the layer count; the profile equals a real build's; a file whose build_model() or
whose code before the first layer cannot run so falls back to a real build with one note."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT
from memoplan.trace import ProfileConfig, profile_model

MODELS = ROOT / "tests" / "models"

# a stack of mid-size layers (dim 512, ffn 2048: 12.6 MB of float32 parameters each)
STACK = """
import os
import torch
from torch import nn
import torch.nn.functional as F

DIM, FFN, VOCAB = 512, 2048, 1024


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.o = nn.Linear(DIM, DIM, bias=False)
        self.up = nn.Linear(DIM, FFN)
        self.down = nn.Linear(FFN, DIM)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, S, 3, 8, DIM // 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, S, DIM))
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build_model():
    torch.manual_seed(0)
    model = Model(int(os.environ["STACK_LAYERS"]))
    CHECK
    return model


def example_inputs(seq_len):
    return (torch.randint(VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0)),)
"""

PEAK = """
import json, resource, sys
from memoplan.trace import ProfileConfig, profile_model
prof = profile_model(ProfileConfig(model_file=sys.argv[1], seq=64))
print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "param_bytes_total": prof.model.param_bytes_total, "notes": prof.notes}))
"""


def _profile_in_subprocess(path: Path, layers: int) -> dict:
    env = {**os.environ, "STACK_LAYERS": str(layers)}
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_the_layer_count(write_model):
    path = write_model(STACK.replace("CHECK", "pass"))
    few, many = (_profile_in_subprocess(path, n) for n in (4, 64))
    grown = many["param_bytes_total"] - few["param_bytes_total"]
    assert grown > 750_000_000  # the 60 more layers hold 756 MB of parameters
    assert few["notes"] == many["notes"] == []
    # they cost nothing: the peak grows by less than 5% of their size (it is the same run)
    assert many["maxrss"] - few["maxrss"] < 0.05 * grown, (few["maxrss"], many["maxrss"])


def _profiles(path: Path, seq: int = 64) -> tuple:
    cfg = ProfileConfig(model_file=path, seq=seq)
    return profile_model(cfg), profile_model(dataclasses.replace(cfg, meta=False))


CASES = [EXAMPLES / "llama" / "model.py", EXAMPLES / "gpt" / "model.py",
         EXAMPLES / "hf_llama" / "model.py",
         *(MODELS / f"{name}.py" for name in ("flash_decoder", "keyword_decoder", "nn_decoder",
                                               "random_decoder", "hf_default"))]


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_profile_built_on_meta_equals_a_real_builds(path):
    """Saved tensors (kinds, token-wise, sizes, laws), node classes, segments, requests, FLOPs,
    the head phase: all the same as from the real weights, with no note."""
    if "hf" in path.stem:
        pytest.importorskip("transformers")
    meta, real = _profiles(path)
    assert meta.to_json() == real.to_json()
    assert not any("real weights" in n for n in meta.notes)


def test_a_model_moved_to_a_device_in_build_model_stays_on_meta(write_model, monkeypatch):
    monkeypatch.setenv("STACK_LAYERS", "2")
    path = write_model(STACK.replace("CHECK", "model = model.cpu().to('cpu', torch.float32)"))
    meta, real = _profiles(path, seq=32)
    assert meta.to_json() == real.to_json() and not meta.notes


@pytest.mark.parametrize("check, why", [
    # data-dependent code in build_model(): no values on the meta device
    ("assert model.layers[0].qkv.weight.abs().sum().item() > 0",
     "build_model() cannot run with its parameters on the meta device"),
    # data-dependent code before the first layer: the parameters it reads are found on fake
    # tensors
    ("model.forward = lambda tokens: Model.forward(model, tokens[:, : int(tokens.max()) + 1000])",
     "code before its first Block does not run on fake tensors"),
])
def test_a_file_that_cannot_run_on_meta_falls_back_to_a_real_build(write_model, monkeypatch,
                                                                   check, why):
    monkeypatch.setenv("STACK_LAYERS", "2")
    path = write_model(STACK.replace("CHECK", check))
    said: list[str] = []
    prof = profile_model(ProfileConfig(model_file=path, seq=32), progress=said.append)
    notes = [n for n in prof.notes if "real weights" in n]
    assert len(notes) == 1 and why in notes[0], prof.notes
    assert [m for m in said if "real weights" in m] == notes
    real = profile_model(ProfileConfig(model_file=path, seq=32, meta=False))
    assert prof.to_json() == {**real.to_json(), "notes": [*notes, *real.notes]}
