"""Profile a model of any size: build it without its weights, give values only to what runs.

``build_model()`` runs with every ``nn.Parameter`` made on the meta device (shape and dtype,
no memory; initialisation in place is free), as transformers' empty-weight loading does.
Buffers are made as the file makes them: they are small, and their values matter (RoPE
frequencies, masks). The profile then materialises, with random values (deterministic, from
each tensor's name), the first instance of the repeated layer (its token-wise probes run on
real values) and the parameters the model reads before that layer is first called (the
embedding), found by running that part of the model on fake tensors. The rest of the model
stays on the meta device; the runs on fake tensors (attention probe, head phase) see its meta
tensors as fake ones on the profile's device (``fake_weights``).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from memoplan.trace.loader import ModelFile


class _StayOnMeta(TorchFunctionMode):
    """``Tensor.to(device)``, ``.cpu()`` and ``.cuda()`` leave a meta tensor on the meta device
    (a dtype still applies): a build_model() may end with ``model.to(device)``."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda) and args[0].is_meta:
            if func is not torch.Tensor.to:
                return args[0]
            _, dtype, _, layout = torch._C._nn._parse_to(
                *args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
            return args[0].to(dtype=dtype or args[0].dtype,
                              memory_format=layout or torch.preserve_format)
        return func(*args, **kwargs)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` made inside is made on the meta device (its data is dropped), and
    stays there when moved to a device."""
    original = nn.Parameter.__dict__["__new__"]

    def new(cls: type, data: Any = None, requires_grad: bool = True) -> nn.Parameter:
        if type(data) in (torch.Tensor, nn.Parameter) and not data.is_meta:
            data = torch.empty_like(data, device="meta")
        return original.__func__(cls, data, requires_grad)

    nn.Parameter.__new__ = staticmethod(new)
    try:
        with _StayOnMeta():
            yield
    finally:
        nn.Parameter.__new__ = original


def _state(module: nn.Module) -> list[tuple[str, dict, str]]:
    """(qualified name, the dict that holds it, its key) of every parameter and buffer, shared
    ones under each of their names."""
    return [(f"{prefix}.{key}" if prefix else key, store, key)
            for prefix, m in module.named_modules(remove_duplicate=False)
            for store in (m._parameters, m._buffers) for key in store if store[key] is not None]


def has_meta(module: nn.Module) -> bool:
    return any(store[key].is_meta for _, store, key in _state(module))


@contextlib.contextmanager
def fake_weights(module: nn.Module, mode: FakeTensorMode,
                 device: str | torch.device) -> Iterator[dict[str, Any]]:
    """Inside ``mode``: the module's parameters and buffers replaced by fake tensors, meta ones
    on ``device``, shared ones still shared; yields qualified name -> fake tensor. (Ops then
    take them as they are, so a view of one is seen to share its storage.)"""
    made: dict[int, torch.Tensor] = {}
    swap: dict[str, torch.Tensor] = {}
    for name, store, key in _state(module):
        t = store[key]
        if id(t) not in made:
            made[id(t)] = (mode.from_tensor(t) if not t.is_meta else torch.empty_strided(
                t.shape, t.stride(), dtype=t.dtype, device=device).requires_grad_(t.requires_grad))
        swap[name] = made[id(t)]
    with _reparametrize_module(module, swap):
        yield swap


_BLOCK = 1_000_003  # a prime: no two rows of a weight get the same values


def _random(name: str, t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Random values for a meta tensor: floating ones normal with std 1/sqrt(last dim) (1 for
    vectors), so activations keep their scale through a layer, drawn for a block of ``_BLOCK``
    elements repeated over its storage (drawing each of a 70B layer's would take seconds);
    others zero."""
    value = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    flat = value.new_empty(0).set_(value.untyped_storage())  # every element of its storage
    if not (value.is_floating_point() or value.is_complex()) or not flat.numel():
        return value.zero_().to(device)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    std = 1.0 / math.sqrt(t.shape[-1]) if t.dim() >= 2 and t.shape[-1] else 1.0
    n = flat.numel()
    block = flat.new_empty(min(n, _BLOCK)).normal_(0.0, std, generator=gen)
    whole = n // block.numel() * block.numel()
    flat[:whole].view(-1, block.numel()).copy_(block)
    flat[whole:].copy_(block[: n - whole])
    return value.to(device)


def materialise(module: nn.Module, device: str | torch.device,
                names: set[str] | None = None) -> None:
    """Give the module's meta parameters and buffers (those in ``names``, else all) real random
    values on ``device``; a tensor shared under several names gets one value."""
    state = _state(module)
    real: dict[int, torch.Tensor] = {}
    for name, store, key in state:
        t = store[key]
        if t.is_meta and (names is None or name in names) and id(t) not in real:
            value = _random(name, t, device)
            real[id(t)] = nn.Parameter(value, t.requires_grad) if isinstance(t, nn.Parameter) \
                else value
    for _, store, key in state:
        if id(store[key]) in real:
            store[key] = real[id(store[key])]


class _Reads(TorchDispatchMode):
    """Storages of the tensors that ops read."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Any = None) -> Any:
        self.storages.update(StorageWeakRef(t.untyped_storage()).cdata
                             for t in pytree.tree_leaves((args, kwargs))
                             if isinstance(t, torch.Tensor) and t.layout == torch.strided)
        return func(*args, **(kwargs or {}))


def read_before(mf: ModelFile, model: nn.Module, layer: nn.Module, seq_len: int,
                device: str | torch.device) -> set[str]:
    """Names of the model's meta parameters and buffers that ops read while it runs on
    ``example_inputs(seq_len)`` up to the first call of ``layer``, found on fake tensors.
    Raises what the run raises."""
    from memoplan.trace.layers import capture_layer_call  # layers uses fake_weights

    with (FakeTensorMode(allow_non_fake_inputs=True) as mode,
          fake_weights(model, mode, device) as fakes):
        keys = {name: StorageWeakRef(t.untyped_storage()).cdata for name, t in fakes.items()}
        with _Reads() as reads:
            capture_layer_call(mf, model, layer, seq_len)
    return {name for name, key in keys.items() if key in reads.storages}
