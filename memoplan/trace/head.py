"""The memory of the model's own code outside its layers, up to the end of the head phase.

Between the last layer's forward and the start of its backward, the model runs what follows
the layers (final norm, LM head, loss) and the start of its backward (the loss's and logits'
gradients); before the first layer it made its inputs' embedding and positions. memoplan does
not plan those tensors: they come from PyTorch's allocator beside the arena, and the plan
budgets them (``pool_bytes``). They are measured here by running the whole model once on fake
tensors (no compute, no memory) and taking the peak of the bytes made outside the layers and
still alive.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from memoplan.trace.loader import ModelFile, make_inputs


class _WindowBytes(TorchDispatchMode):
    """Peak of the bytes of storages made while ``on`` and alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.refs: dict[int, list] = {}
        self.size: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.on:
            return out
        schema = getattr(func, "_schema", None)
        aliases = schema is not None and any(r.alias_info is not None for r in schema.returns)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                st = t.untyped_storage()
                key = StorageWeakRef(st).cdata
                if not aliases:  # a new storage, made in the window
                    self.size[key] = st.nbytes()
                    self.refs[key] = [weakref.ref(t)]
                elif key in self.refs:  # a view of one made in the window keeps it alive
                    self.refs[key].append(weakref.ref(t))
        live = 0
        for key in list(self.refs):
            alive = [r for r in self.refs[key] if r() is not None]
            if alive:
                self.refs[key] = alive
                live += self.size[key]
            else:
                del self.refs[key]
        self.peak = max(self.peak, live)
        return out


def head_phase_bytes(mf: ModelFile, model: torch.nn.Module, layers: tuple[torch.nn.Module, ...],
                     seq_len: int) -> int:
    """Peak bytes that the model's code outside ``layers`` holds up to the head phase's end, at
    ``seq_len`` tokens: its inputs, what it makes before and between the layers (embedding
    output, positions), and after the last layer the final norm, head, loss and their
    gradients down to the last layer's output."""
    window = _WindowBytes()
    out: dict[str, torch.Tensor] = {}

    def entered(module: torch.nn.Module, args: tuple) -> None:
        window.on = False

    def left(module: torch.nn.Module, args: tuple, result: Any) -> None:
        window.on = True
        if module is layers[-1]:
            out["hidden"] = next(t for t in pytree.tree_leaves(result)
                                 if isinstance(t, torch.Tensor) and t.requires_grad)

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(entered),
                                               layer.register_forward_hook(left))]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), window, torch.enable_grad():
            window.on = True
            args, kwargs = make_inputs(mf, seq_len)
            result = model(*args, **kwargs)
            loss = mf.loss_fn(result) if mf.loss_fn is not None else _default_loss(result)
            torch.autograd.grad(loss, out["hidden"])
    finally:
        for h in handles:
            h.remove()
    return window.peak


def _default_loss(result: Any) -> torch.Tensor:
    t = next(x for x in pytree.tree_leaves(result) if isinstance(x, torch.Tensor)
             and x.is_floating_point())
    return t.float().pow(2).mean()
