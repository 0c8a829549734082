"""Executing one layer under a plan: an autograd Function over the layer's traced graphs.

Forward runs the forward graph and keeps, of what backward will read, only what the plan says:
layer input and mixing outputs (and saved tensors that are not token-wise) copied to host whole,
the first ``alpha`` share of the tokens of each token-wise saved tensor copied to host (the
last share where the plan's blocks for them grow down: ``copy_last``), the rest dropped.
Backward brings the copies back, recomputes the dropped tokens from the kept values through the
token-wise ops (never through attention; the union of what the split tensors need, each op
once, writing them into their buffers), and runs the backward graph. Layers in
``keep`` mode keep their saved tensors on the device; ``recompute`` (checkpointed) layers keep
only their input and re-run the whole forward.

On a CPU, "host" copies are plain clones and the copy streams do not exist, so CI checks the
numerics of exactly this schedule. On a GPU, copies go to host buffers carved from one slab that
is sized by the plan and pinned once, reused every step, on a device-to-host stream, and come
back on a host-to-device stream (see ``streams.py``) into views of the plan's arena (see
``arena.py``; on a CPU too, so CI runs that path).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from memoplan.runtime.arena import Arena, Lease, dim_order, empty_laid_out
from memoplan.runtime.program import LayerProgram
from memoplan.runtime.streams import Copier, aligned
from memoplan.trace.recompute import run_on_tokens
from memoplan.trace.replay import Replay


class _RingReplay(Replay):
    """A replay whose attention nodes run through the ring (context parallelism)."""

    def __init__(self, gm: fx.GraphModule, env: dict[str, Any], ring: Any) -> None:
        super().__init__(gm, env)
        self.ring = ring

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and self.ring.handles(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return self.ring(n, args, kwargs)
        return super().run_node(n)


def _replay(prog: LayerProgram, env: dict[str, Any]) -> Replay:
    return _RingReplay(prog.trace.gm, env, prog.ring) if prog.ring is not None \
        else Replay(prog.trace.gm, env)


def _run(prog: LayerProgram, nodes: list[fx.Node], env: dict[str, Any],
         drops: dict[str, list[str]]) -> None:
    """Run ``nodes`` over ``env``, dropping each value after its last use (``drops``)."""
    _replay(prog, env).run_nodes(nodes, drops)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The traced graph already holds autocast's casts: do not cast again while replaying it."""
    return torch.autocast(device_type=device.type, enabled=False)


class LayerState:
    """What one layer call keeps between its forward and its backward."""

    def __init__(self, index: int) -> None:
        self.index = index                             # the layer's position in the model
        self.host: dict[str, torch.Tensor] = {}        # creator -> host copy (whole or k tokens)
        self.slot: dict[str, tuple] = {}               # creator -> its host buffer's slot
        self.device: dict[str, torch.Tensor] = {}      # kept on the device (keep mode, shared)
        self.split_at: dict[str, int] = {}             # creator -> k (tokens copied)
        self.copied_from: dict[str, int] = {}          # creator -> its first copied token
        self.seq: dict[str, int] = {}                  # creator -> its full token count
        self.axis: dict[str, int] = {}                 # creator -> its token axis
        self.shape: dict[str, tuple[torch.Size, torch.dtype]] = {}  # creator -> full shape, dtype
        self.layout: dict[str, list[int]] = {}         # creator -> dim order, outermost first
        self.recomputed_tokens = 0                     # summed over rebuilt tensors
        self.fetched: dict[str, tuple] = {}            # creator -> (device tensor, event)
        self.full: dict[str, torch.Tensor] = {}        # split creator -> its buffer for backward
        self.lease: Lease | None = None                # the prefetch block (whole copies)
        self.split_lease: dict[str, Lease] = {}        # split creator -> its growing block
        self.head: dict[str, torch.Tensor] = {}        # split creator -> copied tokens (no arena)
        self.rng: torch.Tensor | None = None           # generator state the forward began with


def forward_layer(prog: LayerProgram, mode: str, alpha: float, copier: Copier, index: int,
                  params: list[torch.Tensor], inputs: list[torch.Tensor], *,
                  copy_last: bool = False,
                  poison: bool = False) -> tuple[list[torch.Tensor], LayerState]:
    """Run the forward graph; return the outputs and the kept state.

    ``copy_last``: copy the last ``alpha`` share of each split tensor's tokens to host, not
    the first (the layer's split tensors' arena blocks grow down), and recompute the others.

    ``poison`` (debug): overwrite every dropped or copied-out device tensor with NaN after the
    forward, so a backward that read one instead of its rebuilt copy gives NaN gradients.
    """
    env: dict[str, Any] = {}
    _bind_placeholders(prog, env, params, inputs)
    device = inputs[0].device
    # a re-run of the whole forward in backward must draw the same random numbers (dropout
    # masks, philox seeds): keep the generator's state it starts from, as checkpoint does
    rng = _rng_state(device) if mode == "recompute" and prog.random else None
    with torch.no_grad(), _no_autocast(device):
        _run(prog, prog.forward_nodes, env, prog.drop_forward)
    outputs = [env[n.name] for n in _output_nodes(prog)[: prog.num_outputs]]
    state = LayerState(index)
    state.rng = rng
    key = str(index)
    for name, p in zip((p.name for p in prog.placeholders), _placeholder_values(prog, params, inputs)):
        if prog.roles[name] == "shared":
            state.device[name] = p
    copies: list[tuple[str, torch.Tensor]] = []  # (creator, what goes to host)
    for c, h in prog.handling.items():
        if h.how in ("state", "shared"):
            continue
        value = env[c]
        if mode == "keep":
            state.device[c] = value
        elif mode == "recompute":
            if prog.roles.get(c) == "primary":
                state.device[c] = value
        elif value.device != device:
            # a saved value that already lives in host memory (an op that returns CPU
            # tensors beside device ones) is kept by reference: there is no device copy to
            # make. Flash attention's philox seed and offset do not come here on CUDA: torch
            # 2.11 returns them as uint64 tensors on the device (rng_state [2], and a 0-dim
            # placeholder; unused without dropout), so they take the ``whole`` path below
            # (a tiny device-to-host copy and back)
            state.device[c] = value
        elif h.how == "whole":
            state.layout[c] = dim_order(value)
            copies.append((c, value))
        else:
            seq = value.shape[h.axis]
            k = int(alpha * seq)
            state.split_at[c], state.seq[c], state.axis[c] = k, seq, h.axis
            state.copied_from[c] = seq - k if copy_last else 0
            state.shape[c] = (value.shape, value.dtype)
            state.layout[c] = dim_order(value)
            if k:
                copies.append((c, value.narrow(h.axis, state.copied_from[c], k)))
    if copies and not copier.sized:  # the first offloaded layer call sizes the host memory
        copier.reserve(lambda a: _host_bytes(prog, env, a), device)
    for c, value in copies:
        state.slot[c], state.host[c] = copier.to_host(f"{key}/{c}", value, state.layout[c])
    if copies:
        weakref.finalize(state, _state_gone, vars(state), copier).atexit = False
    if mode == "recompute":  # the input must stay even if backward does not read it
        primary = next(p.name for p in prog.placeholders if prog.roles[p.name] == "primary")
        state.device.setdefault(primary, env[primary])
    copier.finish_forward(index)
    if poison and mode != "keep":
        copier.wait_copies(index)  # the copies read these tensors: fill them once they are done
        _poison(prog, env, outputs, state)
    return outputs, state


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def _replayed_rng(device: torch.device, saved: torch.Tensor | None) -> Any:
    """Run with the generator at ``saved`` (the forward's start), then put it back where the
    training loop left it; nothing to do for a graph without random ops (``saved`` None)."""
    if saved is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                               device_type=device.type):
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved, device)
        else:
            torch.set_rng_state(saved)
        yield


def _state_gone(kept: dict[str, Any], copier: Copier) -> None:
    """A layer call's state is gone. After its backward nothing is left to do; without one (its
    graph was dropped, or the backward stopped early or failed) this waits for the copies it
    started and gives back its arena block and host buffers, for later steps to reuse."""
    for fetched in kept["fetched"].values():  # (on the host: this may run on any thread)
        copier.settle(fetched)
    if kept["lease"] is not None:
        kept["lease"].release()
    for lease in kept["split_lease"].values():
        lease.release()
    for c, buf in kept["host"].items():
        copier.give_back(kept["slot"][c], buf)


def _host_bytes(prog: LayerProgram, env: dict[str, Any], alpha: float) -> int:
    """One offloaded layer call's host copies at swap fraction ``alpha`` (what ``forward_layer``
    copies, each buffer rounded up as the copier carves it)."""
    total = 0
    for c, h in prog.handling.items():
        v = env[c]
        if h.how == "whole":
            total += aligned(v.numel() * v.element_size())
        elif h.how == "split":
            seq = v.shape[h.axis]
            k = int(alpha * seq)
            if k:
                total += aligned(v.numel() // seq * k * v.element_size())
    return total


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


def prefetch_layer(state: LayerState, copier: Copier, arena: Arena, device: torch.device) -> None:
    """Start copying a layer's host copies back into the arena (idempotent). Called for layer i
    while layer i+1 runs its backward, and again, as a no-op or to catch up, when layer i's
    backward starts. Tensors copied whole come back into the ``prefetch[i]`` block. A split
    tensor's buffer is laid out like the forward's tensor and its k copied tokens (its first,
    or its last: ``copied_from``) are copied into it here: in its own ``split[i]:NAME`` block,
    where its tokens are outermost (only those k tokens' bytes are claimed now; the rest, where
    its dropped tokens are recomputed, from layer i's own backward on, see ``_own_buffers``),
    else in the prefetch block."""
    if state.lease is None:
        state.lease = arena.lease(f"prefetch[{state.index}]")
    for c, host in state.host.items():
        if c in state.fetched:
            continue
        if c in state.split_at and _tokens_lead(state, c) and not arena.blocks:
            # no arena (a GPU without the planned allocator): only the copied tokens now, in a
            # buffer of their own; the full one, from layer i's own backward (_own_buffers)
            dest = state.head[c] = empty_laid_out(host.shape, host.dtype, state.layout[c],
                                                  device=device)
        elif c in state.split_at:
            full = state.full[c] = _split_buffer(state, c, arena)
            dest = _copied(state, c, full)
        else:
            dest = state.lease.empty(host.shape, host.dtype, state.layout[c])
        state.fetched[c] = copier.prefetch(host, dest, state.layout[c])


def _split_buffer(state: LayerState, c: str, arena: Arena) -> torch.Tensor:
    """Split tensor ``c``'s full buffer: a view over its growing block, when the plan has one
    and its tokens lead its layout at this call's shape; else from the prefetch block."""
    shape, dtype = state.shape[c]
    order = state.layout[c]
    name = f"split[{state.index}]:{c}"
    if name in arena.blocks and _tokens_lead(state, c):
        lease = arena.lease(name)
        # its copied tokens go in now: past the bytes the plan gives them (more tokens copied
        # than planned, alpha raised at run time), they would land on what the plan puts beside
        # them until the block grows: then it grows now, unless it grows down (below it lie the
        # next layer's copied tokens, which grow up soon)
        head = math.prod(shape) // shape[state.axis[c]] * state.split_at[c] * dtype.itemsize
        full = lease.tensor(shape, dtype, order, last=head)
        if full is not None and (head <= lease.size or (lease.grow > 0 and lease.extend())):
            state.split_lease[c] = lease
            return full
        lease.release()
    return state.lease.empty(shape, dtype, order)


def _copied(state: LayerState, c: str, full: torch.Tensor) -> torch.Tensor:
    """The copied tokens of split tensor ``c`` in ``full``, a buffer of all its tokens."""
    return full.narrow(state.axis[c], state.copied_from[c], state.split_at[c])


def _tokens_lead(state: LayerState, c: str) -> bool:
    """Whether split tensor ``c``'s token axis is outermost in its layout (size-1 dims aside):
    then its copied tokens are a prefix of its buffer."""
    shape, _ = state.shape[c]
    return [d for d in state.layout[c] if shape[d] > 1][:1] == [state.axis[c]]


def _own_buffers(state: LayerState, copier: Copier, arena: Arena) -> None:
    """At layer i's own backward: the buffers of split tensors with no token copied (alpha 0),
    or whose copied tokens came back into a buffer of their own (no arena: moved in now, a
    device-to-device copy on the compute stream), and the later bytes of every growing block,
    where the dropped tokens are recomputed. Where those bytes are still in use (a plan that
    does not match the run), the tensor moves to an ordinary buffer (its copied tokens with
    it), counted as an arena fallback."""
    for c in state.split_at:
        if c not in state.full:
            state.full[c] = _split_buffer(state, c, arena)
        if c in state.head:
            head = copier.ready(state.fetched[c])
            _copied(state, c, state.full[c]).copy_(head)
            del state.head[c]
            state.fetched[c] = (state.full[c], None)
    for c, lease in list(state.split_lease.items()):
        if lease.extend():
            continue
        shape, dtype = state.shape[c]
        moved = empty_laid_out(shape, dtype, state.layout[c], device=arena.device)
        if state.split_at[c]:
            copier.ready(state.fetched[c])
            _copied(state, c, moved).copy_(_copied(state, c, state.full[c]))
        state.full[c] = moved
        arena.misses += 1
        lease.release()
        del state.split_lease[c]


def backward_layer(prog: LayerProgram, mode: str, state: LayerState, copier: Copier, arena: Arena,
                   params: list[torch.Tensor], grad_outputs: list[torch.Tensor], *,
                   poison: bool = False,
                   planned: Callable[[str], contextlib.AbstractContextManager] = (
                       lambda phase: contextlib.nullcontext()),
                   ) -> list[torch.Tensor | None]:
    """Rebuild what backward reads (inside ``planned("recompute")``), run the backward graph
    (inside ``planned("backward")``: the planned allocator's phases); grads of (inputs,
    params).

    ``poison`` (debug): fill the layer's arena block with NaN when it is given back."""
    device = grad_outputs[0].device
    env: dict[str, Any] = dict(state.device)
    prefetch_layer(state, copier, arena, device)
    _own_buffers(state, copier, arena)
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
        with planned("recompute"):
            if mode == "recompute":
                with _replayed_rng(device, state.rng):
                    _run(prog, prog.forward_nodes, env, prog.drop_refold)
            _rebuild_splits(prog, state, env, copier)
            _materialise_reads(prog, env)
        # from here on only the graph's values hold what came back: each is let go after its
        # last use in backward (with the arena off, its memory goes back to PyTorch's pool
        # then; in the arena, the block is given back when the layer's backward ends)
        state.full.clear()
        state.fetched.clear()
        state.device.clear()
        with planned("backward"):
            _run(prog, prog.backward_nodes, env, prog.drop_backward)
    flat = pytree.tree_leaves(_output_nodes(prog))
    grads = [env[n.name] if isinstance(n, fx.Node) else None for n in flat[prog.num_outputs:]]
    env.clear()
    # a gradient must not point into the block that is given back now
    grads = [g.clone() if isinstance(g, torch.Tensor) and arena.holds(g) else g for g in grads]
    if state.lease is not None:
        state.lease.release(poison=poison)
        state.lease = None
    for lease in state.split_lease.values():
        lease.release(poison=poison)
    state.split_lease.clear()
    for c, buf in state.host.items():  # the compute stream has waited for their copies back
        copier.give_back(state.slot[c], buf)
    state.host.clear()
    state.full.clear()
    state.fetched.clear()
    return grads


def _rebuild_splits(prog: LayerProgram, state: LayerState, env: dict[str, Any],
                    copier: Copier) -> None:
    """Every split tensor, whole, in its buffer: k tokens came from the host (its first, or its
    last), the others are recomputed into it, in one pass over the token-wise ops they need."""
    # (first dropped token, dropped tokens, all tokens) -> split tensors
    groups: dict[tuple[int, int, int], list[str]] = {}
    for c, k in state.split_at.items():
        if k:
            copier.ready(state.fetched[c])
        first = k if state.copied_from[c] == 0 else 0
        groups.setdefault((first, state.seq[c] - k, state.seq[c]), []).append(c)
    for (first, n, seq), creators in groups.items():
        if n:
            group = frozenset(creators)
            nodes, drops = prog.rebuild(group)

            def stored(name: str, first: int = first, n: int = n) -> torch.Tensor:
                return state.full[name].narrow(state.axis[name], first, n)

            def into(name: str, group: frozenset = group) -> torch.Tensor | None:
                """Where a rebuilt tensor's op may write its tokens directly: its buffer, when
                those tokens lie there as the op would lay them out (dense, in the forward's
                dim order)."""
                if name in group and stored(name).permute(state.layout[name]).is_contiguous():
                    return stored(name)
                return None

            def made(name: str, value: torch.Tensor, group: frozenset = group) -> None:
                if name in group:  # not written in place: copied
                    stored(name).copy_(value)

            run_on_tokens(nodes, env.__getitem__, prog.axes, range(first, first + n), seq,
                          drops=drops, made=made, into=into)
            state.recomputed_tokens += n * len(creators)
    for c in state.split_at:
        env[c] = state.full[c]


def _materialise_reads(prog: LayerProgram, env: dict[str, Any]) -> None:
    """Every forward value backward reads that is not yet in ``env`` (views of kept values)."""
    replay = _replay(prog, env)
    for name in prog.read_by_backward:
        replay.ensure(name, prog.node)


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
