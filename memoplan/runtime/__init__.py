"""The runtime: execute a plan inside an ordinary training loop.

- ``apply.py``: ``load_plan``, ``apply(model, plan)`` (wraps the repeated layers), ``stats``.
- ``program.py``: the layer traced on its device and matched against the profiled graph.
- ``execute.py``: forward (keep/copy/drop by plan) and backward (bring back, recompute, run).
- ``streams.py``: host copies (clones on a CPU; pinned buffers and side streams on a GPU).
- ``arena.py``: the plan's arena; the runtime's own buffers are views into it.
- ``allocator.py``: ``install_allocator()``, the process-wide allocator that replays the plan's
  addresses for each layer's transient tensors (C++ in ``csrc/``, built at first use), and
  ``memory_stats()`` / ``reset_peak_memory_stats()``, which stand in for torch.cuda's under it.

Depends on torch, the plan format and memoplan.trace's tracing helpers; never on the solver.
"""

from memoplan.runtime.allocator import install_allocator, memory_stats, reset_peak_memory_stats
from memoplan.runtime.apply import apply, load_plan, plan_from_text, prepare, stats

__all__ = ["apply", "install_allocator", "load_plan", "memory_stats", "plan_from_text",
           "prepare", "reset_peak_memory_stats", "stats"]
