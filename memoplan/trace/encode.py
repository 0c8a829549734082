"""fx node arguments as plain JSON, so a profile carries its forward graph as data.

A node reference becomes ``{"node": name}``; dtypes, devices, layouts and memory formats
become ``{"dtype": "bfloat16"}`` and the like; non-finite floats ``{"float": "inf"}``; lists and
tuples JSON arrays; ints, finite floats, bools, strings and None stay as they are. Anything else
becomes ``{"unsupported": type name}``, which the code generator refuses to render.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx


def encode_arg(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return [encode_arg(x) for x in a]
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": str(a)}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    return {"unsupported": type(a).__name__}


def encode_call(n: fx.Node) -> tuple[list, dict]:
    """A call node's (args, kwargs) as JSON data."""
    return [encode_arg(a) for a in n.args], {k: encode_arg(v) for k, v in n.kwargs.items()}
