"""The layer signature hash that ties a plan to the layer it was solved for."""

from __future__ import annotations

import hashlib
import json

import torch


def layer_signature(layer: torch.nn.Module) -> str:
    """sha256 over the layer's class name and its parameters' and buffers' names, shapes, dtypes.

    The runtime recomputes it from the user's model and refuses plans of another layer.
    """
    items = [type(layer).__name__]
    items += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in layer.named_parameters()]
    items += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in layer.named_buffers()]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
