"""The solve stage's configuration (``memoplan solve`` options).

The ``gpus`` of a job are ``dp x cp x tp``:

- ``cp``, context parallelism (ring attention): each sequence is split over ``cp`` ranks, each
  holding ``seq / cp`` tokens; only attention talks to the other ranks.
- ``dp``, data parallelism: ``dp`` sequences at once. FSDP2 shards the model states over the
  ``dp x cp`` ranks.
- ``tp``, tensor(+sequence) parallelism: accepted for planning only (the plan says so in
  ``config["tp_runtime_supported"]``; memoplan's runtime runs FSDP2 x context parallel).

By default ``tp`` is 1 and ``cp`` spans one node: ``min(gpus, gpus_per_node)`` (precisely: the
largest divisor of ``gpus / tp`` that is at most ``gpus_per_node / tp``), ``dp`` the rest;
``--cp`` or ``--dp`` alone sets the other, and both must multiply to ``gpus / tp``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memoplan.errors import MemoplanError
from memoplan.hardware import Hardware

ROTATE_METHODS = ("alltoall", "allgather")


@dataclass(frozen=True, kw_only=True)
class SolveConfig:
    """Inputs of one solve; all of them are written into the plan's ``config``. ``cp``, ``dp``
    and ``rotate_method`` are resolved when the config is made (see the module docstring)."""

    seq: int                      # tokens of one sequence (the whole iteration's length)
    gpus: int = 1                 # GPUs in all: dp x cp x tp
    gpus_per_node: int = 8        # GPUs sharing one node's host memory and PCIe
    tp: int = 1                   # tensor(+sequence)-parallel degree (planning only)
    cp: int | None = None         # context-parallel degree; None: one node's worth
    dp: int | None = None         # data-parallel degree; None: what --gpus leaves
    load_balance: bool = True     # causal ring attention with the sequence cut in 2 x cp chunks
    rotate_method: str | None = "auto"  # how K/V go round the ring: alltoall, allgather, auto
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
        if self.tp < 1 or (self.cp is not None and self.cp < 1) or (
                self.dp is not None and self.dp < 1):
            raise MemoplanError("--tp, --cp and --dp must be at least 1.")
        if self.gpus % self.tp:
            raise MemoplanError(f"--tp {self.tp} does not divide --gpus {self.gpus}.")
        cp, dp = _degrees(self.gpus, self.gpus_per_node, self.tp, self.cp, self.dp)
        object.__setattr__(self, "cp", cp)
        object.__setattr__(self, "dp", dp)
        object.__setattr__(self, "rotate_method", _rotate_method(self.rotate_method, cp))
        if self.seq % self.split:
            raise MemoplanError(
                f"--seq {self.seq} does not divide across {self.split} GPUs (--cp {cp} x --tp "
                f"{self.tp}; tokens per GPU would be {self.seq / self.split:.2f}). Pick a length "
                f"that is a multiple of {self.seq_multiple}.")
        if self.seq % self.seq_multiple:
            raise MemoplanError(
                f"--seq {self.seq} does not split evenly under load balancing: causal context "
                f"parallelism cuts the sequence into 2 x --cp {cp} = {2 * cp} chunks (two per "
                f"rank), each split over --tp {self.tp}, so --seq must be a multiple of "
                f"{self.seq_multiple}. Pick such a length, or pass --no-load-balance.")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise MemoplanError(f"--alpha must lie in [0, 1], got {self.alpha}.")
        if self.time_limit <= 0:
            raise MemoplanError(f"--time-limit must be positive, got {self.time_limit}.")
        if self.keep_last is not None and self.keep_last < 0:
            raise MemoplanError("--keep-last must be 0 or more.")

    @property
    def split(self) -> int:
        """GPUs one sequence is split over (context x tensor parallel)."""
        return self.tp * self.cp

    @property
    def seq_multiple(self) -> int:
        """What ``seq`` must be a multiple of: 2 chunks per context rank under load balancing."""
        return self.split * (2 if self.cp > 1 and self.load_balance else 1)

    @property
    def tokens_per_gpu(self) -> int:
        return self.seq // self.split

    @property
    def local_seq(self) -> int:
        """The length one context-parallel rank's layer runs at (its tokens, S / cp): where
        every size law is evaluated (``solve.swap``)."""
        return self.seq // self.cp

    @property
    def fsdp_degree(self) -> int:
        """Ranks FSDP2 shards the model states over (data x context parallel)."""
        return self.dp * self.cp

    @property
    def gpus_sharing_node(self) -> int:
        return min(self.gpus, self.gpus_per_node)

    def to_json(self) -> dict:
        d = asdict(self)
        d["tokens_per_gpu"] = self.tokens_per_gpu
        d["tp_runtime_supported"] = self.tp == 1
        return d


def _degrees(gpus: int, gpus_per_node: int, tp: int, cp: int | None,
             dp: int | None) -> tuple[int, int]:
    """(cp, dp) from what was given (see the module docstring)."""
    ranks = gpus // tp
    of = f"--gpus {gpus}" if tp == 1 else f"--gpus {gpus} / --tp {tp} = {ranks}"
    if cp is not None and dp is not None:
        if cp * dp != ranks:
            raise MemoplanError(f"--dp {dp} x --cp {cp} = {dp * cp} does not match {of}: the "
                                f"GPUs are dp x cp x tp.")
        return cp, dp
    if cp is not None:
        if ranks % cp:
            raise MemoplanError(f"--cp {cp} does not divide {of}.")
        return cp, ranks // cp
    if dp is not None:
        if ranks % dp:
            raise MemoplanError(f"--dp {dp} does not divide {of}.")
        return ranks // dp, dp
    per_node = max(1, gpus_per_node // tp)
    cp = max(c for c in range(1, min(ranks, per_node) + 1) if ranks % c == 0)
    return cp, ranks // cp


def _rotate_method(method: str | None, cp: int) -> str | None:
    """How ring attention moves K/V between ranks (PyTorch's ``set_rotate_method``); None when
    there is no ring (cp 1). ``auto`` takes the one with the smaller workspace
    (``solve.parallel``): alltoall, whose three K/V blocks never exceed allgather's cp in
    forward and cp + 1 in backward; allgather (PyTorch's default, one collective instead of
    cp - 1) on request."""
    if method not in (None, "auto", *ROTATE_METHODS):
        raise MemoplanError(f"--rotate-method must be auto, {' or '.join(ROTATE_METHODS)}, got "
                            f"{method!r}.")
    if cp == 1:
        return None
    return "alltoall" if method in (None, "auto") else method
