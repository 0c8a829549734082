"""Executing one layer under a plan: an autograd Function over the layer's traced graphs.

Forward runs the forward graph and keeps, of what backward will read, only what the plan says:
layer input and mixing outputs (and saved tensors that are not token-wise) copied to host whole,
the first ``alpha`` share of the tokens of each token-wise saved tensor copied to host, the rest
dropped. Backward brings the copies back, recomputes the dropped tokens from the kept values
through the token-wise ops (never through attention), and runs the backward graph. Layers in
``keep`` mode keep their saved tensors on the device; ``recompute`` (checkpointed) layers keep
only their input and re-run the whole forward.

On a CPU, "host" copies are plain clones and the copy streams do not exist, so CI checks the
numerics of exactly this schedule. On a GPU, copies go to pinned host buffers that are
allocated once per (layer, tensor) and reused every step, on a device-to-host stream, and come
back on a host-to-device stream (see ``streams.py``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from memoplan.runtime.program import LayerProgram
from memoplan.runtime.streams import Copier
from memoplan.trace.recompute import run_on_tokens


def _args_of(n: fx.Node, env: dict[str, Any]) -> tuple[tuple, dict]:
    return pytree.tree_map(lambda a: env[a.name] if isinstance(a, fx.Node) else a,
                           (n.args, n.kwargs), is_leaf=lambda a: isinstance(a, fx.Node))


def _run(nodes: list[fx.Node], env: dict[str, Any], drops: dict[str, list[str]]) -> None:
    """Run ``nodes`` over ``env``, dropping each value after its last use (``drops``)."""
    for n in nodes:
        args, kwargs = _args_of(n, env)
        env[n.name] = n.target(*args, **kwargs)
        for name in drops.get(n.name, ()):
            env.pop(name, None)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The traced graph already holds autocast's casts: do not cast again while replaying it."""
    return torch.autocast(device_type=device.type, enabled=False)


class LayerState:
    """What one layer call keeps between its forward and its backward."""

    def __init__(self) -> None:
        self.host: dict[str, torch.Tensor] = {}        # creator -> host copy (whole or first k tokens)
        self.device: dict[str, torch.Tensor] = {}      # kept on the device (keep mode, shared)
        self.split_at: dict[str, int] = {}             # creator -> k (tokens copied)
        self.seq: dict[str, int] = {}                  # creator -> its full token count
        self.layout: dict[str, list[int]] = {}         # creator -> dim order, outermost first
        self.recomputed_tokens = 0                     # summed over rebuilt tensors
        self.fetched: dict[str, tuple] = {}            # creator -> (device tensor, event)


def forward_layer(prog: LayerProgram, mode: str, alpha: float, copier: Copier, key: str,
                  params: list[torch.Tensor], inputs: list[torch.Tensor], *,
                  poison: bool = False) -> tuple[list[torch.Tensor], LayerState]:
    """Run the forward graph; return the outputs and the kept state.

    ``poison`` (debug): overwrite every dropped or copied-out device tensor with NaN after the
    forward, so a backward that read one instead of its rebuilt copy gives NaN gradients.
    """
    env: dict[str, Any] = {}
    _bind_placeholders(prog, env, params, inputs)
    device = inputs[0].device
    with torch.no_grad(), _no_autocast(device):
        _run(prog.forward_nodes, env, prog.drop_forward)
    outputs = [env[n.name] for n in _output_nodes(prog)[: prog.num_outputs]]
    state = LayerState()
    for name, p in zip((p.name for p in prog.placeholders), _placeholder_values(prog, params, inputs)):
        if prog.roles[name] == "shared":
            state.device[name] = p
    for c, h in prog.handling.items():
        if h.how in ("state", "shared"):
            continue
        value = env[c]
        if mode == "keep":
            state.device[c] = value
        elif mode == "recompute":
            if prog.roles.get(c) == "primary":
                state.device[c] = value
        elif h.how == "whole":
            state.host[c] = copier.to_host(f"{key}/{c}", value)
        else:
            seq = value.shape[h.axis]
            k = int(alpha * seq)
            state.split_at[c], state.seq[c] = k, seq
            state.layout[c] = sorted(range(value.dim()), key=lambda d: (-value.stride(d), d))
            if k:
                state.host[c] = copier.to_host(f"{key}/{c}", value.narrow(h.axis, 0, k))
    if mode == "recompute":  # the input must stay even if backward does not read it
        primary = next(p.name for p in prog.placeholders if prog.roles[p.name] == "primary")
        state.device.setdefault(primary, env[primary])
    copier.finish_forward()
    if poison and mode != "keep":
        _poison(prog, env, outputs, state)
    return outputs, state


def _poison(prog: LayerProgram, env: dict[str, Any], outputs: list[torch.Tensor],
            state: LayerState) -> None:
    keep = {t.untyped_storage().data_ptr() for t in outputs}
    keep |= {t.untyped_storage().data_ptr() for t in state.device.values()}
    keep |= {env[p.name].untyped_storage().data_ptr() for p in prog.placeholders
             if p.name in env and isinstance(env[p.name], torch.Tensor)}
    for c, h in prog.handling.items():
        v = env.get(c)
        if h.how in ("whole", "split") and isinstance(v, torch.Tensor) and v.is_floating_point() \
                and v.untyped_storage().data_ptr() not in keep:
            v.fill_(float("nan"))


def prefetch_layer(state: LayerState, copier: Copier, device: torch.device) -> None:
    """Start copying a layer's host copies back (idempotent). Called for layer i while layer
    i+1 runs its backward, and again, as a no-op or to catch up, when layer i's backward starts."""
    for c, t in state.host.items():
        if c not in state.fetched:
            state.fetched[c] = copier.prefetch(t, device)


def backward_layer(prog: LayerProgram, mode: str, state: LayerState, copier: Copier,
                   params: list[torch.Tensor], grad_outputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Rebuild what backward reads, run the backward graph; grads of (inputs, params)."""
    device = grad_outputs[0].device
    env: dict[str, Any] = dict(state.device)
    prefetch_layer(state, copier, device)
    for c in state.host:
        if c not in state.split_at:
            env[c] = copier.ready(state.fetched[c])
    states = iter(params)
    grads_in = iter(grad_outputs)
    for p in prog.placeholders:
        role = prog.roles[p.name]
        if role in ("param", "buffer"):
            env[p.name] = next(states)
        elif role == "grad_out":
            env[p.name] = next(grads_in)
    with torch.no_grad(), _no_autocast(device):
        if mode == "recompute":
            _run(prog.forward_nodes, env, prog.drop_refold)
        for c in state.split_at:
            env[c] = _rebuild_split(prog, c, state, env, copier, device)
        _materialise_reads(prog, env)
        _run(prog.backward_nodes, env, prog.drop_backward)
    flat = pytree.tree_leaves(_output_nodes(prog))
    grads = [env[n.name] if isinstance(n, fx.Node) else None for n in flat[prog.num_outputs:]]
    return grads


def _rebuild_split(prog: LayerProgram, c: str, state: LayerState, env: dict[str, Any],
                   copier: Copier, device: torch.device) -> torch.Tensor:
    """The full tensor ``c``: its first k tokens from host, the others recomputed."""
    axis = prog.handling[c].axis
    k, seq = state.split_at[c], state.seq[c]
    parts = []
    if k:
        parts.append(copier.ready(state.fetched[c]))
    if k < seq:
        tokens = torch.arange(k, seq, device=device)
        parts.append(_recompute_tokens(prog, c, env, tokens, seq))
        state.recomputed_tokens += seq - k
    order = state.layout[c]
    joined = torch.cat([p.permute(order) for p in parts], dim=order.index(axis)).contiguous()
    return joined.permute([order.index(d) for d in range(len(order))])


def _recompute_tokens(prog: LayerProgram, c: str, env: dict[str, Any], tokens: torch.Tensor,
                      seq: int) -> torch.Tensor:
    """Re-run ``c``'s token-wise ancestry for ``tokens`` only (kept inputs sliced to them)."""
    nodes = [prog.node[name] for name in prog.recompute_order[c]]
    return run_on_tokens(nodes, env.__getitem__, prog.axes, tokens, seq)[c]


def _materialise_reads(prog: LayerProgram, env: dict[str, Any]) -> None:
    """Every forward value backward reads that is not yet in ``env`` (views of kept values)."""
    for name in prog.read_by_backward:
        _ensure(prog, name, env)


def _ensure(prog: LayerProgram, name: str, env: dict[str, Any]) -> Any:
    if name in env:
        return env[name]
    n = prog.node[name]
    for a in pytree.tree_leaves((n.args, n.kwargs)):
        if isinstance(a, fx.Node):
            _ensure(prog, a.name, env)
    args, kwargs = _args_of(n, env)
    env[name] = n.target(*args, **kwargs)
    return env[name]


def _output_nodes(prog: LayerProgram) -> list:
    out = next(n for n in prog.trace.gm.graph.nodes if n.op == "output")
    return pytree.tree_leaves(out.args[0])


def _placeholder_values(prog: LayerProgram, params: list[torch.Tensor],
                        inputs: list[torch.Tensor]) -> list[Any]:
    """Values for the placeholders in order: params+buffers, tensor inputs, (no grad_outs)."""
    states = iter(params)
    ins = iter(inputs)
    out = []
    for p in prog.placeholders:
        role = prog.roles[p.name]
        if role in ("param", "buffer"):
            out.append(next(states))
        elif role in ("primary", "shared"):
            out.append(next(ins))
    return out


def _bind_placeholders(prog: LayerProgram, env: dict[str, Any], params: list[torch.Tensor],
                       inputs: list[torch.Tensor]) -> None:
    names = [p.name for p in prog.placeholders if prog.roles[p.name] != "grad_out"]
    for name, v in zip(names, _placeholder_values(prog, params, inputs)):
        env[name] = v
