"""Every replay of a layer graph goes through one interpreter (memoplan.trace.replay.Replay):
values dropped after their last use, and every error says which op of the layer failed and the
line of the user's code it came from, keeping its type (an out-of-memory stays one)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from conftest import EXAMPLES
from memoplan.trace.graph import release_after, trace_layer
from memoplan.trace.layers import capture_layer_call
from memoplan.trace.loader import load_model_file
from memoplan.trace.replay import Replay


def _llama_trace():
    mf = load_model_file(EXAMPLES / "llama" / "model.py")
    model = mf.build_model()
    call = capture_layer_call(mf, model, model.layers[0], 32)
    return call, trace_layer(model.layers[0], *call, seq_len=32, layer_name="LlamaBlock",
                             real=False)


def test_an_error_names_the_op_and_the_users_line():
    call, tr = _llama_trace()
    model_params = dict(load_model_file(EXAMPLES / "llama" / "model.py").build_model()
                        .layers[0].named_parameters())
    placeholders = [n for n in tr.gm.graph.nodes if n.op == "placeholder"]
    values = {p.name: v.detach() for p, v in zip(placeholders, model_params.values())}
    for p in placeholders:
        if tr.roles[p.name] == "primary":
            values[p.name] = torch.randn(1, 32, 65)  # one hidden unit too many
        elif tr.roles[p.name] == "shared":
            values[p.name] = call[0][1 if "2" in p.name else 2]
    with pytest.raises(RuntimeError) as e:
        Replay(tr.gm, values).run_nodes(tr.forward_nodes)
    note = "\n".join(getattr(e.value, "__notes__", []))
    assert "replaying the layer's op" in note and "examples/llama/model.py" in note


def test_values_go_after_their_last_use_and_errors_keep_their_type():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.mul.Tensor, (x, x))
    b = g.call_function(torch.ops.aten.add.Tensor, (a, x))
    g.output(b)
    gm = fx.GraphModule(torch.nn.Module(), g)
    nodes = [a, b]
    values = Replay(gm, {"x": torch.ones(3)}).run_nodes(nodes, release_after(nodes, {"x", b.name}))
    assert set(values) == {"x", b.name} and torch.equal(values[b.name], torch.full((3,), 2.0))

    def oom(t):
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    c = g.call_function(oom, (x,))
    with pytest.raises(torch.OutOfMemoryError) as e:
        Replay(gm, {"x": torch.ones(3)}).run_nodes([c])
    assert "oom" in "\n".join(e.value.__notes__)
