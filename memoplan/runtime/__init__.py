"""The runtime: execute a plan inside an ordinary training loop.

- ``apply.py``: ``load_plan``, ``apply(model, plan)`` (wraps the repeated layers).
- ``program.py``: the layer traced on its device and matched against the profiled graph.
- ``execute.py``: forward (keep/copy/drop by plan) and backward (bring back, recompute, run).
- ``streams.py``: host copies (clones on a CPU; pinned buffers and side streams on a GPU).

Depends on torch, the plan format and memoplan.trace's tracing helpers; never on the solver.
"""

from memoplan.runtime.apply import apply, load_plan, plan_from_text

__all__ = ["apply", "load_plan", "plan_from_text"]
