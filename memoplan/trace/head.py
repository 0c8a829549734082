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
from memoplan.trace.meta import fake_weights


class LiveBytes(TorchDispatchMode):
    """Peak total bytes of the storages that ops inside the mode made (an op returning a view
    or writing in place, on its input's storage, makes none) and that are alive at once, taken
    while ``measuring``.
    Storages are recorded while ``recording``; a view of a recorded storage keeps it counted.
    The profile records and measures only in a window; tests record from the start."""

    def __init__(self, *, recording: bool = True, measuring: bool = True) -> None:
        super().__init__()
        self.recording, self.measuring = recording, measuring
        self.refs: dict[int, list] = {}
        self.size: dict[int, int] = {}
        self.peak = 0

    def live(self) -> int:
        total = 0
        for key in list(self.refs):
            alive = [r for r in self.refs[key] if r() is not None]
            if alive:
                self.refs[key] = alive
                total += self.size[key]
            else:
                del self.refs[key]
        return total

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # an output on an input's storage is a view or an in-place write (``_unsafe_view``'s
        # schema does not say so), not a new storage
        inputs = {StorageWeakRef(t.untyped_storage()).cdata
                  for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                st = t.untyped_storage()
                key = StorageWeakRef(st).cdata
                if key in self.refs and all(r() is None for r in self.refs[key]):
                    del self.refs[key]  # a dead storage's address, reused by this one
                if key not in inputs and self.recording:  # a new storage
                    self.size[key] = st.nbytes()
                    self.refs[key] = [weakref.ref(t)]
                elif key in self.refs:  # a view of a recorded one keeps it alive
                    self.refs[key].append(weakref.ref(t))
        if self.measuring:
            self.peak = max(self.peak, self.live())
        return out


def head_phase_bytes(mf: ModelFile, model: torch.nn.Module, layers: tuple[torch.nn.Module, ...],
                     seq_len: int, device: str | torch.device = "cpu") -> int:
    """Peak bytes that the model's code outside ``layers`` holds up to the head phase's end, at
    ``seq_len`` tokens: its inputs, what it makes before and between the layers (embedding
    output, positions), and after the last layer the final norm, head, loss and their
    gradients down to the last layer's output. The model's parameters and buffers are made
    fake before (meta ones on ``device``): a view of one, such as a Linear's transposed weight,
    holds no new memory."""
    window = LiveBytes(recording=False, measuring=False)
    out: dict[str, torch.Tensor] = {}

    def entered(module: torch.nn.Module, args: tuple) -> None:
        window.recording = window.measuring = False

    def left(module: torch.nn.Module, args: tuple, result: Any) -> None:
        window.recording = window.measuring = True
        if module is layers[-1]:
            out["hidden"] = next(t for t in pytree.tree_leaves(result)
                                 if isinstance(t, torch.Tensor) and t.requires_grad)

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(entered),
                                               layer.register_forward_hook(left))]
    try:
        with (FakeTensorMode(allow_non_fake_inputs=True) as mode,
              fake_weights(model, mode, device), window, torch.enable_grad()):
            window.recording = window.measuring = True
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
