"""Recompute a token-wise segment for a subset of tokens (the exactness behind token-wise swap).

Inputs that carry one token axis are sliced to the chosen tokens; integer arguments equal to the
full length (the sizes in view/expand/reshape calls) become the subset's length. Because every
op of a token-wise segment acts on each token alone, the result equals the same tokens of the
full computation; tests check that on random subsets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from memoplan.trace.graph import LayerTrace, upcast


def select_tokens(v: torch.Tensor, axis: int, tokens: torch.Tensor) -> torch.Tensor:
    """``v.index_select(axis, tokens)`` laid out in memory in the same dimension order as ``v``,
    so that the views the graph takes of it (transpose then view) stay valid."""
    order = sorted(range(v.dim()), key=lambda d: (-v.stride(d), d))   # outermost first
    inverse = [order.index(d) for d in range(v.dim())]
    picked = v.permute(order).index_select(order.index(axis), tokens).contiguous()
    return picked.permute(inverse)


def recompute_segment(trace: LayerTrace, nodes: list[str], axes: dict[str, list[tuple[int, ...]]],
                      tokens: torch.Tensor) -> dict[str, Any]:
    """Values of ``nodes`` (a token-wise segment, in graph order) for ``tokens`` only.

    Values from outside the segment come from the trace's real (shadow) run.
    """
    by_name = {n.name: n for n in trace.gm.graph.nodes}
    seq = trace.seq_len
    k = int(tokens.numel())
    local: dict[str, Any] = {}

    def value(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a.name in local:
                return local[a.name]
            v = trace.real[a.name]
            ax = axes.get(a.name, [])
            if isinstance(v, torch.Tensor) and len(ax) == 1 and len(ax[0]) == 1:
                return select_tokens(v, ax[0][0], tokens)
            return v
        if isinstance(a, int) and not isinstance(a, bool) and a == seq:
            return k
        return upcast(a)

    with torch.no_grad():
        for name in nodes:
            n = by_name[name]
            args, kwargs = pytree.tree_map(value, (n.args, n.kwargs),
                                           is_leaf=lambda x: isinstance(x, fx.Node))
            local[name] = n.target(*args, **kwargs)
    return local
