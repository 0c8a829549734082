"""The solve stage's configuration (``memoplan solve`` options)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memoplan.errors import MemoplanError
from memoplan.hardware import Hardware


@dataclass(frozen=True, kw_only=True)
class SolveConfig:
    """Inputs of one solve; all of them are written into the plan's ``config``."""

    seq: int                      # tokens of one sequence (the whole iteration's length)
    gpus: int = 1                 # GPUs in all
    gpus_per_node: int = 8        # GPUs sharing one node's host memory and PCIe
    tp: int | None = None         # tensor(+sequence)-parallel degree; default: all GPUs
    cp: int = 1                   # context-parallel degree
    hardware: Hardware
    time_limit: float = 20.0      # seconds for each MIP (three of them: forward, backward, iteration)
    alpha: float | None = None    # force this swap fraction on every offloaded layer
    keep_last: int | None = 1     # last layers kept on the GPU, never offloaded; None: as many
                                  # as the GPU holds (solve.plan.auto_keep_last)
    state_bytes_per_param: float = 16.0  # weights, grads, optimizer states per parameter (bf16 Adam: 2+2+12)
    align: int = 512              # every request rounded up to this many bytes (allocator granularity)

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise MemoplanError("--gpus and --gpus-per-node must be at least 1.")
        if self.cp < 1 or (self.tp is not None and self.tp < 1):
            raise MemoplanError("--tp and --cp must be at least 1.")
        if self.gpus % self.split:
            raise MemoplanError(f"--tp {self.tp} x --cp {self.cp} = {self.split} does not divide "
                                f"--gpus {self.gpus}.")
        if self.seq % self.split:
            raise MemoplanError(
                f"--seq {self.seq} does not divide across {self.split} GPUs (tokens per GPU would "
                f"be {self.seq / self.split:.2f}). Pick a length that is a multiple of {self.split}.")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise MemoplanError(f"--alpha must lie in [0, 1], got {self.alpha}.")
        if self.time_limit <= 0:
            raise MemoplanError(f"--time-limit must be positive, got {self.time_limit}.")
        if self.keep_last is not None and self.keep_last < 0:
            raise MemoplanError("--keep-last must be 0 or more.")

    @property
    def tp_degree(self) -> int:
        return self.tp if self.tp is not None else self.gpus // self.cp

    @property
    def split(self) -> int:
        """GPUs one sequence is split over (tensor/sequence x context parallel)."""
        return self.tp_degree * self.cp

    @property
    def tokens_per_gpu(self) -> int:
        return self.seq // self.split

    @property
    def gpus_sharing_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)

    def to_json(self) -> dict:
        d = asdict(self)
        d["tp"] = self.tp_degree
        d["tokens_per_gpu"] = self.tokens_per_gpu
        return d
