"""The layer signature hash that ties a plan to the layer it was solved for.

A layer wrapped by FSDP2 (``fully_shard``) is an instance of ``FSDP<Class>`` whose parameters
are shards (DTensors of the global shape); it is known by its own class and hashed with the
dtype its parameters are unsharded to for compute (the ``MixedPrecisionPolicy``'s
``param_dtype``), which is the dtype the layer was profiled in.
"""

from __future__ import annotations

import hashlib
import json

import torch


def layer_class_name(layer: torch.nn.Module) -> str:
    """The layer's class name; for FSDP2's ``FSDP<Class>``, the class it wraps."""
    cls = type(layer)
    index = getattr(layer, "_orig_cls_mro_index", None)  # FSDP2: [FSDP<Orig>, FSDPModule, Orig]
    if index is not None and hasattr(layer, "_get_fsdp_state"):
        cls = cls.__mro__[index]
    return cls.__name__


def _compute_dtypes(layer: torch.nn.Module) -> dict[int, torch.dtype]:
    """id of each FSDP2 sharded parameter -> the dtype it is unsharded to (none for others)."""
    get_state = getattr(layer, "_get_fsdp_state", None)
    group = getattr(get_state(), "_fsdp_param_group", None) if get_state else None
    want = getattr(getattr(group, "mp_policy", None), "param_dtype", None)
    if want is None:
        return {}
    return {id(fp.sharded_param): want for fp in group.fsdp_params
            if fp.sharded_param.is_floating_point()}


def layer_signature(layer: torch.nn.Module) -> str:
    """sha256 over the layer's class name and its parameters' and buffers' names, shapes, dtypes.

    The runtime recomputes it from the user's model and refuses plans of another layer.
    """
    dtypes = _compute_dtypes(layer)
    items = [layer_class_name(layer)]
    items += [f"{n}:{tuple(t.shape)}:{dtypes.get(id(t), t.dtype)}"
              for n, t in layer.named_parameters()]
    items += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in layer.named_buffers()]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
