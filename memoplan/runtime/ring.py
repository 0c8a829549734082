"""Attention under context parallelism: a layer's attention ops replayed through the ring.

With context parallelism each of ``cp`` ranks holds S/cp tokens of the sequence (in the
load-balanced head-tail order: rank r holds chunks r and 2cp-1-r of 2cp), and only attention
talks to the other ranks. memoplan traces the layer at the local length, and its replays
(forward, backward, a checkpointed layer's re-run) run the attention nodes of that graph
through PyTorch's own ring engine, the one ``torch.distributed.tensor.experimental.
context_parallel`` uses: ``_templated_ring_attention`` and its backward, over the cp process
group, with the same kernel the trace recorded (CPU flash attention in the tests, CUDA's flash,
efficient or cuDNN kernels on a GPU). Everything else, memoplan's token split and token-wise
recomputation included, stays local.

The engine is private (``_context_parallel/_attention.py`` in torch 2.9 and later,
``experimental/_attention.py`` before); ``tests/test_distributed.py`` fails loudly if the names
used here disappear. Its options are module globals shared with the user's own context
parallelism: they are set for each call and restored after it.

Under the planned allocator (``install_allocator()``), no trace lists the ring's requests (K/V
made contiguous, the send copies, the all-gather and all-to-all outputs, the merge's fp32
temporaries, the dq/dk/dv accumulators): level 1 budgets them as ``ring:*`` blocks, and each
forward/backward script names their span (``PhaseScript.ring``). Inside a planned phase
(:meth:`RingAttention.placed`), each ring call is a detour of the allocator (``mp_detour``):
the script waits, so no ring buffer takes a slot planned for a later tensor, and the ring's
requests go first-fit into that span (a checkpointed layer's re-run, which has no span: into
the phase's ``recompute[i]`` block). The call's results (output and logsumexp; dq, dk, dv) are
then copied out of the span, laid out as traced, into the slots the script plans for them, so
the span is free again for what level 1 puts there after the op.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from memoplan.errors import MemoplanError

aten = torch.ops.aten

# forward attention ops -> their backward ops' name for the output gradient
FORWARD = (aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default)
BACKWARD = {aten._scaled_dot_product_flash_attention_for_cpu_backward.default: "grad_out",
            aten._scaled_dot_product_flash_attention_backward.default: "grad_out",
            aten._scaled_dot_product_efficient_attention_backward.default: "grad_out_",
            aten._scaled_dot_product_cudnn_attention_backward.default: "grad_out"}
SEQ_DIM = 2  # every fused attention op takes (batch, heads, tokens, head_dim)
# memory-efficient attention pads its logsumexp to a multiple of this many tokens
EFFICIENT = (aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_efficient_attention_backward.default)
LSE_PAD = 32


def efficient_tokens_multiple(load_balance: bool, causal: bool) -> int:
    """The tokens per rank memory-efficient attention needs under the ring: its logsumexp is
    padded to a multiple of `LSE_PAD` tokens, which the merge broadcasts against the output,
    and load-balanced causal attention halves the queries (and that logsumexp)."""
    return 2 * LSE_PAD if load_balance and causal else LSE_PAD


def engine() -> Any:
    """torch's ring-attention module (private)."""
    try:  # torch >= 2.9
        from torch.distributed.tensor.experimental._context_parallel import _attention
    except ImportError:  # torch 2.5 .. 2.8
        from torch.distributed.tensor.experimental import _attention
    for name in ("_templated_ring_attention", "_templated_ring_attention_backward",
                 "_cp_options", "_RotateMethod"):
        if not hasattr(_attention, name):
            raise MemoplanError(
                f"This torch ({torch.__version__}) has no '{name}' in its context-parallel "
                f"engine, which memoplan's ring attention uses. Use torch 2.5 to 2.13, or train "
                f"without context parallelism (--cp 1).")
    return _attention


def _bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """An aten call's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _laid_out(x: Any, like: Any, copy: bool = False) -> Any:
    """``x`` with the strides of the traced value ``like`` (later views in the graph rely on
    them; the ring's merge returns contiguous tensors); ``copy``: in a new tensor even where
    its strides are already those (out of the ring's span, into the phase's planned slot)."""
    if not isinstance(x, torch.Tensor):
        return x
    if not isinstance(like, torch.Tensor) or x.shape != like.shape:
        return x.clone() if copy else x
    if x.stride() == like.stride() and not copy:
        return x
    return torch.empty_strided(x.shape, like.stride(), dtype=x.dtype, device=x.device).copy_(x)


@dataclass(frozen=True)
class _Placement:
    """Where one planned phase puts its ring calls' requests (see :meth:`RingAttention.placed`)."""

    planner: Any                     # allocator.PlanAllocator whose phase is active
    span: tuple[int, int] | None     # (arena offset, bytes); None: the phase's own block
    scripted: bool                   # the phase's script plans the ring call's results


def _tokens(x: Any) -> int | None:
    """The token count of an attention operand (a tensor, or a traced node's value)."""
    if hasattr(x, "meta"):
        x = x.meta.get("val")
    return int(x.shape[SEQ_DIM]) if isinstance(x, torch.Tensor) and x.dim() > SEQ_DIM else None


class RingAttention:
    """Runs a layer graph's attention nodes through the ring over ``group``."""

    def __init__(self, group: Any, *, load_balance: bool = True, rotate: str = "allgather"):
        if rotate not in ("allgather", "alltoall"):
            raise MemoplanError(f"Unknown ring rotate method {rotate!r}: 'allgather' or "
                                f"'alltoall'.")
        self.engine = engine()
        self.group = group
        self.load_balance = load_balance
        self.rotate = rotate
        self._local = threading.local()  # the placements of the phases running on this thread

    def handles(self, n: fx.Node) -> bool:
        return n.target in FORWARD or n.target in BACKWARD

    def check(self, nodes: list[fx.Node], layer_name: str) -> None:
        """Refuse what the ring cannot run (dropout, an explicit mask, memory-efficient
        attention at a length whose logsumexp it pads), naming the node."""
        from memoplan.trace.replay import where

        for n in nodes:
            if n.target in FORWARD:
                a = _bind(n.target, n.args, n.kwargs)
                if a.get("dropout_p") or a.get("attn_mask") is not None \
                        or a.get("attn_bias") is not None:
                    raise MemoplanError(
                        f"Layer '{layer_name}' calls attention with dropout or an explicit mask "
                        f"({where(n)}); ring attention (context parallelism) runs causal or full "
                        f"attention without either. Set the attention dropout to 0 and let the "
                        f"model use is_causal (no attention_mask), or train with --cp 1.")
                tokens = _tokens(a.get("query"))
                if tokens is not None:
                    self._check_lse(n, tokens, bool(a.get("is_causal", False)), layer_name)

    def _check_lse(self, n: fx.Node, tokens: int, causal: bool, layer_name: str = "") -> None:
        """Memory-efficient attention (CUDA's kernel for float32) returns its logsumexp padded
        to a multiple of 32 tokens; the ring's merge broadcasts it against the output, and
        load-balanced it halves the queries (and that logsumexp): the tokens per rank must be
        a multiple of 32, or of 64 when load-balanced, else the merge fails or is wrong. Every
        cp rank holds as many tokens, so every rank refuses, before any collective."""
        if n.target not in EFFICIENT:
            return
        from memoplan.trace.replay import where

        need = efficient_tokens_multiple(self.load_balance, causal)
        if tokens % need:
            layer = f"Layer '{layer_name}' runs" if layer_name else "This layer runs"
            raise MemoplanError(
                f"{layer} memory-efficient attention ({where(n)}; CUDA's kernel for float32) "
                f"with {tokens} tokens per rank under context parallelism. That kernel pads its "
                f"logsumexp to a multiple of {LSE_PAD} tokens, which the ring's merge"
                f"{' (load-balanced: it halves the queries)' if need > LSE_PAD else ''} cannot "
                f"use: the tokens per rank must be a multiple of {need}. Train on sequences "
                f"whose length is a multiple of {need} x cp, or in bfloat16 or float16 (flash "
                f"attention), or with --cp 1.")

    @contextlib.contextmanager
    def placed(self, planner: Any, script: Any) -> Iterator[None]:
        """Within one planned phase of the planned allocator (entered after ``planner.begin``
        with the phase's ``script``, a ``PhaseScript``, left before ``planner.end``): each ring
        call is a detour (``mp_detour``) whose requests go first-fit into ``script.ring``, the
        span level 1 budgets for them (the phase's own block where the script has none: a
        checkpointed layer's re-run), and whose results are then copied into the slots the
        script plans for them. ``planner`` None: nothing changes."""
        if planner is None:
            yield
            return
        stack = self._placements()
        stack.append(_Placement(planner, getattr(script, "ring", None),
                                bool(getattr(script, "slots", ()))))
        try:
            yield
        finally:
            stack.pop()

    def _placements(self) -> list[_Placement]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    @contextlib.contextmanager
    def _detour(self) -> Iterator[_Placement | None]:
        """The allocator's detour for one ring call, ended also when the call raises."""
        stack = self._placements()
        if not stack:
            yield None
            return
        place = stack[-1]
        place.planner.detour(*(place.span or (0, 0)))  # (0, 0): the phase's own block
        try:
            yield place
        finally:
            place.planner.detour_end()

    @contextlib.contextmanager
    def _options(self, causal: bool, dtype: torch.dtype) -> Iterator[None]:
        o = self.engine._cp_options
        old = (o.enable_load_balance, o.rotate_method, o.convert_to_f32)
        o.enable_load_balance = self.load_balance and causal
        o.rotate_method = {"allgather": self.engine._RotateMethod.ALL_GATHER,
                           "alltoall": self.engine._RotateMethod.ALL_TO_ALL}[self.rotate]
        o.convert_to_f32 = dtype in (torch.float16, torch.bfloat16)  # never casts fp64 down
        try:
            yield
        finally:
            o.enable_load_balance, o.rotate_method, o.convert_to_f32 = old

    def __call__(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        """``n``'s result, computed through the ring, laid out as the trace recorded it (in
        the phase's planned slots, inside a planned phase: see :meth:`placed`)."""
        a = _bind(n.target, args, kwargs)
        causal = bool(a.pop("is_causal", False))
        traced = n.meta.get("val")
        self._check_lse(n, int(a["query"].shape[SEQ_DIM]), causal)
        if n.target in FORWARD:
            q, k, v = a.pop("query"), a.pop("key"), a.pop("value")
            if "compute_log_sumexp" in a:
                a["compute_log_sumexp"] = True  # the merge of the ring's blocks needs it
            with self._options(causal, q.dtype), self._detour() as place:
                result = self.engine._templated_ring_attention(
                    self.group, SEQ_DIM, n.target, q, k, v, is_causal=causal, **a)
        else:
            name = BACKWARD[n.target]
            grad = a.pop(name)
            q, k, v, out, lse = (a.pop(x) for x in ("query", "key", "value", "out", "logsumexp"))
            with self._options(causal, q.dtype), self._detour() as place:
                result = self.engine._templated_ring_attention_backward(
                    self.group, SEQ_DIM, n.target, grad_out=grad, grad_out_name=name, query=q,
                    key=k, value=v, out=out, logsumexp=lse, is_causal=causal, **a)
        # the detour is over: the results, in the ring's span, go to the script's slots for
        # them (the script resumes at them), so the span holds nothing past the call
        copy = place is not None and place.scripted
        traced = traced if isinstance(traced, (tuple, list)) else (traced,)
        return tuple(_laid_out(x, t, copy)
                     for x, t in zip(result, list(traced) + [None] * len(result)))


def cp_group(mesh_or_group: Any, cp: int) -> Any:
    """The process group of the cp ranks, from a DeviceMesh (its "cp" dimension, or its only
    one) or a ProcessGroup; its size must be the plan's cp."""
    import torch.distributed as dist

    group = mesh_or_group
    if hasattr(mesh_or_group, "get_group"):  # a DeviceMesh
        names = getattr(mesh_or_group, "mesh_dim_names", None) or ()
        group = mesh_or_group.get_group("cp" if "cp" in names else 0) \
            if mesh_or_group.ndim > 1 or "cp" in names else mesh_or_group.get_group()
    size = dist.get_world_size(group)
    if size != cp:
        raise MemoplanError(f"The context-parallel mesh has {size} ranks, the plan was solved "
                            f"for cp {cp} (--cp). Pass the mesh (or process group) of the cp "
                            f"ranks, or solve a plan with --cp {size}.")
    return group
