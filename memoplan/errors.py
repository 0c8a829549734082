"""memoplan's own error type: every user-facing failure is one of these.

The CLI maps them to exit statuses and prints the message as one paragraph; nothing else in
memoplan prints tracebacks for bad input.
"""

from __future__ import annotations


class MemoplanError(Exception):
    """A failure the user can fix; ``str(error)`` says how.

    ``exit_code`` is the CLI's exit status: 2 for bad input (files, options, models),
    3 for an infeasible configuration, 4 for a solver that found no plan in time.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InfeasibleError(MemoplanError):
    """The configuration cannot fit (GPU or host memory); the message names the numbers."""

    exit_code = 3


class SolverTimeoutError(MemoplanError):
    """The solver found no feasible plan within its time limit."""

    exit_code = 4
