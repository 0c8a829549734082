"""The emit stage: a plan as a generated, readable Python module.

- ``module.py``: ``emit_module(plan) -> str`` renders the profiled forward graph (every aten call,
  grouped and marked by token-wise segment and token-mixing op), one function per token-wise
  segment (what recomputation runs), the schedule constants, and an ``apply(model)`` entry.
"""

from memoplan.emit.module import emit_module

__all__ = ["emit_module"]
