"""Load a user's model file and check that it follows the convention.

A model file defines ``build_model()``, ``example_inputs(seq_len)`` and optionally
``loss_fn(output)`` and ``LAYER = "ClassName"`` (see examples/README.md). Every way such a file
can be wrong ends here as a :class:`MemoplanError` that names the file and what to change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from memoplan.errors import MemoplanError


@dataclass(frozen=True, kw_only=True)
class ModelFile:
    path: Path
    module: ModuleType
    build_model: Callable[[], torch.nn.Module]
    example_inputs: Callable[[int], Any]
    loss_fn: Callable[[Any], torch.Tensor] | None
    layer: str | None


def _user_error_summary(path: Path, exc: BaseException) -> str:
    """The user's own error, briefly: its type, message and the last frame in their file."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    where = f" (line {frames[-1].lineno}: {frames[-1].line})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def load_model_file(path: str | Path) -> ModelFile:
    """Import ``path`` as a module and return its convention functions."""
    path = Path(path).resolve()
    if not path.is_file():
        raise MemoplanError(f"Model file '{path}' does not exist. Pass the path of a Python file "
                            f"that defines build_model() and example_inputs(seq_len).")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"memoplan_user_model_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MemoplanError(f"'{path}' cannot be imported as Python (is it a .py file?).")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise MemoplanError(f"Importing the model file '{path}' failed: "
                            f"{_user_error_summary(path, e)}. Fix the file and run again.") from e
    build = getattr(module, "build_model", None)
    inputs = getattr(module, "example_inputs", None)
    for fname, fn in (("build_model", build), ("example_inputs", inputs)):
        if not callable(fn):
            raise MemoplanError(
                f"The model file '{path}' defines no function '{fname}'. A model file must define "
                f"build_model() -> torch.nn.Module and example_inputs(seq_len) -> tuple or dict "
                f"of inputs (see examples/README.md)."
            )
    loss_fn = getattr(module, "loss_fn", None)
    layer = getattr(module, "LAYER", None)
    if layer is not None and not isinstance(layer, str):
        raise MemoplanError(f"LAYER in '{path}' must be a class name string, not {layer!r}.")
    return ModelFile(path=path, module=module, build_model=build, example_inputs=inputs,
                     loss_fn=loss_fn if callable(loss_fn) else None, layer=layer)


def call_user(path: Path, what: str, fn: Callable, *args: Any) -> Any:
    """Call a function of the user's file, turning its exceptions into a clear MemoplanError."""
    try:
        return fn(*args)
    except MemoplanError:
        raise
    except Exception as e:
        raise MemoplanError(f"{what} in '{path}' failed: {_user_error_summary(path, e)}. "
                            f"Fix the model file and run again.") from e


def build(mf: ModelFile) -> torch.nn.Module:
    model = call_user(mf.path, "build_model()", mf.build_model)
    if not isinstance(model, torch.nn.Module):
        raise MemoplanError(f"build_model() in '{mf.path}' returned {type(model).__name__}, "
                            f"not a torch.nn.Module.")
    return model


def make_inputs(mf: ModelFile, seq_len: int) -> tuple[tuple, dict]:
    """``example_inputs(seq_len)`` as (args, kwargs)."""
    inputs = call_user(mf.path, f"example_inputs({seq_len})", mf.example_inputs, seq_len)
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise MemoplanError(f"example_inputs({seq_len}) in '{mf.path}' returned "
                        f"{type(inputs).__name__}; return a tuple of positional arguments or a "
                        f"dict of keyword arguments for model(...).")
