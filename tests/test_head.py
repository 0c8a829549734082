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
