"""The head phase's memory as a law, per token and fixed: a loss computed a chunk at a time
(examples/llama/model.py's loss_fn) holds a chunk's float32 temporaries at any length, and the
law measured by `profile` must predict a length it never saw, neither far above nor below."""

from __future__ import annotations

from conftest import EXAMPLES
from memoplan.trace import ProfileConfig, profile_model
from memoplan.trace.head import head_phase_bytes
from memoplan.trace.loader import build, load_model_file
from memoplan.trace.layers import find_repeated_layer


def test_the_head_law_predicts_an_unmeasured_length_of_a_chunked_loss():
    path = EXAMPLES / "llama" / "model.py"
    info = profile_model(ProfileConfig(model_file=path, seq=512)).model
    mf = load_model_file(path)
    model = build(mf)
    layers = find_repeated_layer(model).instances
    for n in (3000, 100000, 300000):  # lengths profile does not measure
        real = head_phase_bytes(mf, model, layers, n)
        law = info.head_bytes_per_token * n + info.head_bytes_fixed
        assert real <= law, (n, real, law)  # never under: the plan's fit check rests on it
        if n >= 100000:  # over by at most the chunk's temporaries, which long lengths dwarf
            assert law <= 1.03 * real, (n, real, law)
    # the chunk shows as a fixed part: per token at 512 tokens the head holds far more than
    # the slope says, so a per-token figure from a short length would overshoot at 100K
    short = head_phase_bytes(mf, model, layers, 512) / 512
    assert info.head_bytes_fixed > 0 and short > 1.5 * info.head_bytes_per_token


def test_the_llama_examples_chunked_cross_entropy_equals_plain_cross_entropy(monkeypatch):
    import importlib.util

    import torch
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("llama_example", EXAMPLES / "llama" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "LOSS_CHUNK", 7)  # 46 rows: 6 full chunks and a short one
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        logits = torch.randn(2, 23, 50, dtype=dtype, requires_grad=True)
        loss = mod.loss_fn(logits)
        (got,) = torch.autograd.grad(loss, logits)
        labels = torch.randint(50, (46,), generator=torch.Generator().manual_seed(1))
        want_loss = F.cross_entropy(logits.reshape(-1, 50).float(), labels)
        (want,) = torch.autograd.grad(want_loss, logits)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 1e-2)
