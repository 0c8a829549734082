"""memoplan: offline memory planning for long-context transformer training.

Stages (each a subpackage; imports flow one way):
  trace/    model file -> profile (repeated layer, saved/transient tensors, size laws, FLOPs)
  solve/    profile + config -> plan (swap fractions, bi-level DSA address plan, checker)
  emit/     plan JSON in and out, generated runtime module
  runtime/  executes a plan inside a training loop (depends on torch and the plan format only)
Shared records live in ``memoplan.ir``; the CLI (``memoplan.cli``) is a thin shell over these.
"""

__version__ = "0.1.0"
