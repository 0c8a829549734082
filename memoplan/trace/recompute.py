"""Recompute a token-wise segment for a subset of tokens (the exactness behind token-wise swap).

Inputs that carry one token axis are sliced to the chosen tokens; size arguments of
view/expand/reshape calls get the subset's length at the token axis. Because every
op of a token-wise segment acts on each token alone, the result equals the same tokens of the
full computation; tests check that on random subsets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from memoplan.errors import MemoplanError
from memoplan.trace.replay import Replay
from memoplan.trace.graph import LayerTrace, upcast


def dim_order(t: torch.Tensor) -> list[int]:
    """``t``'s dims in memory order, outermost first (what a copy must keep for the graph's
    views of it to stay valid)."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def tokens_outermost(t: torch.Tensor, axis: int | None) -> bool:
    """Whether ``t`` is dense from the start of its storage with its token axis outermost in
    memory (size-1 dims aside): then its first k tokens are a prefix of its buffer."""
    if axis is None or t.storage_offset() != 0:
        return False
    order = dim_order(t)
    if not t.permute(order).is_contiguous():
        return False
    outer = [d for d in order if t.shape[d] > 1]
    return bool(outer) and outer[0] == axis


def select_tokens(v: torch.Tensor, axis: int, tokens: torch.Tensor | range) -> torch.Tensor:
    """``v.index_select(axis, tokens)`` laid out in memory in the same dimension order as ``v``,
    so that the views the graph takes of it (transpose then view) stay valid. A ``range`` of
    tokens is a narrow: no copy when the token axis is outermost in memory."""
    order = dim_order(v)
    inverse = [order.index(d) for d in range(v.dim())]
    laid = v.permute(order)
    if isinstance(tokens, range) and tokens.step == 1:
        picked = laid.narrow(order.index(axis), tokens.start, len(tokens))
    else:
        picked = laid.index_select(order.index(axis), torch.as_tensor(tokens, device=v.device))
    return picked.contiguous().permute(inverse)


class TokenReplay(Replay):
    """Runs token-wise ops for a subset of the tokens (see :func:`run_on_tokens`)."""

    def __init__(self, gm: fx.GraphModule, lookup: Callable[[str], Any],
                 axes: dict[str, list[tuple[int, ...]]], tokens: torch.Tensor | range, seq: int,
                 cast: Callable[[Any], Any], made: Callable[[str, Any], None] | None,
                 into: Callable[[str], torch.Tensor | None] | None) -> None:
        super().__init__(gm, load=lookup)
        self.axes, self.tokens, self.seq, self.cast = axes, tokens, seq, cast
        self.k = len(tokens) if isinstance(tokens, range) else int(tokens.numel())
        self.made, self.into = made, into

    def outside(self, n: fx.Node, v: Any) -> Any:  # sliced to the tokens, once
        ax = self.axes.get(n.name, [])
        if isinstance(v, torch.Tensor) and len(ax) == 1 and len(ax[0]) == 1:
            v = select_tokens(v, ax[0][0], self.tokens)
        return v

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        args = pytree.tree_map(lambda a: self.value(a) if isinstance(a, fx.Node) else self.cast(a),
                               (n.args, n.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))
        out_axes = self.axes.get(n.name, [])
        if len(out_axes) == 1 and len(out_axes[0]) == 1:
            return tuple(_resize(a, out_axes[0][0], self.seq, self.k) for a in args[0]), args[1]
        return args

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        dest = self.into(n.name) if self.into is not None else None
        if dest is not None and _run_into(n, args, kwargs, dest):
            return dest
        out = n.target(*args, **kwargs)
        if self.made is not None:
            self.made(n.name, out)
        return out


def run_on_tokens(nodes: list[fx.Node], lookup: Callable[[str], Any],
                  axes: dict[str, list[tuple[int, ...]]], tokens: torch.Tensor | range, seq: int,
                  cast: Callable[[Any], Any] = lambda a: a, *,
                  drops: dict[str, list[str]] | None = None,
                  made: Callable[[str, Any], None] | None = None,
                  into: Callable[[str], torch.Tensor | None] | None = None) -> dict[str, Any]:
    """Run ``nodes`` (token-wise ops, in graph order) for ``tokens`` only.

    Values from outside come from ``lookup(name)``; those with one token axis are sliced to the
    tokens. A size list argument whose entry at the node's output token axis equals ``seq``
    (view/reshape/expand sizes) gets the subset's length there; no other integer is touched, so
    a hidden size that happens to equal the length stays as it is. ``cast`` maps the other
    constant arguments (the profile's float32 shadow run upcasts dtypes). ``into(name)`` may
    give a tensor for the op to write its result into (its ``out=`` form); ``made(name,
    value)`` sees every other value as it is made; ``drops`` (node -> names, see
    ``release_after``) lets go of each value after its last use, so that the values are not all
    alive at once.
    """
    if not nodes:
        return {}
    replay = TokenReplay(nodes[0].graph.owning_module, lookup, axes, tokens, seq, cast, made,
                         into)
    with torch.no_grad():
        return replay.run_nodes(nodes, drops)


@functools.cache
def _out_overload(target: Any) -> Any:
    """``target``'s ``out=`` overload when it takes the same arguments, else None (e.g.
    ``var.default(x, unbiased)`` against ``var.out(x, dim, unbiased, ...)``)."""
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return None
    same = [(a.name, str(a.type)) for a in target._schema.arguments]
    for name in (f"{target._overloadname}_out", "out"):
        if name in packet.overloads():
            op = getattr(packet, name)
            args = [(a.name, str(a.type)) for a in op._schema.arguments if not a.is_out]
            return op if args == same else None
    return None


def _run_into(n: fx.Node, args: tuple, kwargs: dict, dest: torch.Tensor) -> bool:
    """Run ``n``'s op writing into ``dest`` through its ``out=`` overload; False where it has
    none with the same arguments (nothing was written then)."""
    op = _out_overload(n.target)
    if op is None:
        return False
    shape, at = dest.shape, dest.data_ptr()
    try:
        op(*args, **kwargs, out=dest)
    except (RuntimeError, TypeError):
        return False
    if dest.shape != shape or dest.data_ptr() != at:  # it was resized: not the tokens'
        raise MemoplanError(f"Internal: recomputing '{n.name}' ({n.target}) for a token "
                            f"subset gave shape {tuple(dest.shape)}, not {tuple(shape)}.")
    return True


def _resize(arg: Any, axis: int, seq: int, k: int) -> Any:
    """A size list with ``seq`` at the token axis gets ``k`` there."""
    if isinstance(arg, (list, tuple)) and len(arg) > axis and all(
            isinstance(x, int) and not isinstance(x, bool) for x in arg) and arg[axis] == seq:
        return type(arg)(k if i == axis else x for i, x in enumerate(arg))
    return arg


def recompute_segment(trace: LayerTrace, nodes: list[str], axes: dict[str, list[tuple[int, ...]]],
                      tokens: torch.Tensor) -> dict[str, Any]:
    """Values of ``nodes`` (a token-wise segment) for ``tokens`` only, on the trace's real
    (float32 shadow) values."""
    by_name = {n.name: n for n in trace.gm.graph.nodes}
    return run_on_tokens([by_name[n] for n in nodes], lambda name: trace.real[name], axes, tokens,
                         trace.seq_len, cast=upcast)
