"""memoplan: offline memory planning for long-context transformer training.

Stages (each a subpackage; imports flow one way):
  trace/    model file -> profile (repeated layer, saved/transient tensors, size laws, FLOPs)
  solve/    profile + config -> plan (swap fractions, bi-level DSA address plan, checker)
  emit/     plan JSON in and out, generated runtime module
  runtime/  executes a plan inside a training loop (depends on torch and the plan format only)
Shared records live in ``memoplan.ir``; the CLI (``memoplan.cli``) is a thin shell over these.

What a training script types::

    import memoplan
    plan = memoplan.load_plan("plan.json")
    model = memoplan.runtime.apply(model, plan)

``import memoplan`` imports nothing heavy (no torch, python-mip or matplotlib): the stages and
the names below are imported on first access (PEP 562).
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("emit", "runtime", "solve", "trace")
_FUNCTIONS = {  # name -> module it comes from
    "load_plan": "memoplan.jsonio",   # reading a plan needs no torch
    "apply": "memoplan.runtime",
}
__all__ = sorted([*_SUBPACKAGES, *_FUNCTIONS])


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(_FUNCTIONS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
