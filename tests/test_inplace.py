"""In-place writes in a layer's forward (memoplan.trace.inplace): writes into the layer's own
tensors are rewritten out of place and compute what eager computes (dtype kept, defaults
spelled out, chains of writes, a write into a view of a tensor nobody reads again); a write
whose tensor is read again through another alias (also views of unbind/split, which reach the
graph as getitem) and one into a parameter or buffer are refused with the source line."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from memoplan.errors import MemoplanError
from memoplan.trace.graph import trace_layer
from memoplan.trace.replay import Replay


def _trace(layer: nn.Module, x: torch.Tensor):
    return trace_layer(layer, (x,), {}, seq_len=x.shape[1], layer_name=type(layer).__name__)


def _forward(tr, layer, x):
    """The traced forward replayed on real values: the layer's first output."""
    flat = [*layer.parameters(), *layer.buffers(), x]
    ph = [n for n in tr.gm.graph.nodes if n.op == "placeholder"]
    r = Replay(tr.gm, {p.name: v for p, v in zip(ph, flat)})
    with torch.no_grad():
        r.run_nodes(tr.forward_nodes)
    out = torch.utils._pytree.tree_leaves(next(n for n in tr.gm.graph.nodes if n.op == "output").args)[0]
    return r.values[out.name]


class Chain(nn.Module):
    """dropout's bernoulli_ (p=0.5 is bernoulli_'s default, so the trace omits it) then div_, an
    in-place add that would promote bf16 to fp32 out of place, and torch's nn.RMSNorm."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.gain = nn.Parameter(torch.randn(8))
        self.norm = nn.RMSNorm(8)

    def forward(self, x):
        h = self.lin(self.norm(x))
        mask = torch.empty_like(h).bernoulli_(0.5)
        mask.div_(0.5)
        low = (h * mask).to(torch.bfloat16)
        low += self.gain * x  # stays bf16 in eager
        return low


def test_writes_into_own_tensors_compute_what_eager_computes():
    layer, x = Chain(), torch.randn(1, 6, 8, requires_grad=True)
    tr = _trace(layer, x)
    assert not any(n.target._schema.is_mutable for n in tr.forward_nodes
                   if hasattr(n.target, "_schema"))
    torch.manual_seed(3)
    eager = layer(x)
    torch.manual_seed(3)
    replayed = _forward(tr, layer, x.detach())
    assert replayed.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(replayed, eager.detach())


class ThroughUnbind(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        gains = torch.ones(2, x.shape[1], 1)
        lo, hi = gains.unbind(0)
        lo.mul_(3.0)  # writes gains[0] too
        return self.lin(x) * gains.sum(0)


class IntoBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(1)
        return self.lin(x)


@pytest.mark.parametrize("layer, message", [
    (ThroughUnbind(), "read again afterwards through another alias"),
    (IntoBuffer(), "writes in place into the buffer 'seen'"),
])
def test_hazardous_writes_are_refused_with_the_source_line(layer, message):
    with pytest.raises(MemoplanError, match=message) as e:
        _trace(layer, torch.randn(1, 6, 8, requires_grad=True))
    assert "test_inplace.py" in str(e.value) and "line" in str(e.value)
