"""``memoplan sweep``: one plan per sequence length, to find the longest length that fits.

For every length the full solve runs (swap fractions, both levels, the fit check); a length whose
plan does not fit the GPU (:class:`~memoplan.errors.InfeasibleError`) becomes a row with
``fits=False`` and the solver's reason. Nothing here prints: the CLI renders the rows.

Every row also says, per strategy of :data:`STRATEGIES`, whether it fits (``fits_by``) and what
limits it (``limits``, one of :data:`LIMITS`):

- the plan: ``gpu`` when it does not fit the GPU, ``host`` when it pins more than the node's host
  memory (the two kinds of :class:`InfeasibleError`); when it fits, ``host`` when host memory
  holds the swap fraction alpha below 1 (or forces the host fallback), else ``pcie`` when copies
  do not hide (predicted stall > 0) or the link holds alpha below 1, else ``none``;
- keep-all and full recompute: ``gpu`` when their predicted GPU memory
  (``Prediction.gpu_bytes``) exceeds the hardware's ``gpu_mem_gb``, else ``none``;
- offload-all: ``gpu`` as above, ``host`` when every layer's saved tensors pinned by the GPUs of
  a node exceed its host memory, ``pcie`` when its copies do not hide (its predicted iteration
  is longer than keep-all's), else ``none``.

A length whose plan does not fit still gets the baselines' figures (:func:`baseline_prediction`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from memoplan.errors import InfeasibleError, MemoplanError
from memoplan.ir import Plan, Prediction, Profile
from memoplan.solve import SolveConfig, solve_plan
from memoplan.units import fmt_tokens, parse_seq

STRATEGIES = ("plan", "keep_all", "full_recompute", "offload_all")
LIMITS = ("none", "gpu", "host", "pcie")
MAX_LENGTHS = 64  # a sweep longer than this is almost surely a typo in --seq


@dataclass(frozen=True, kw_only=True)
class SweepRow:
    """One sequence length of a sweep (bytes per GPU; ``None`` where the plan did not fit).

    ``alpha`` is the swap fraction of the offloaded layers (``None`` when no layer offloads);
    ``mfu`` and ``gpu_bytes`` are the cost model's figures keyed by :data:`STRATEGIES` (without
    ``plan`` when the plan does not fit); ``fits_by`` and ``limits`` say per strategy whether it
    fits and what limits it (module docstring). ``fits`` is the plan's.
    """

    seq: int
    tokens_per_gpu: int
    fits: bool
    alpha: float | None = None
    host_bytes: int | None = None
    arena_bytes: int | None = None
    gpu_total_bytes: int | None = None
    mfu: dict[str, float] | None = None
    gpu_bytes: dict[str, int] | None = None
    reason: str | None = None
    fits_by: dict[str, bool] | None = None
    limits: dict[str, str] | None = None

    @property
    def limit(self) -> str:
        """What limits the plan at this length (:data:`LIMITS`)."""
        return (self.limits or {}).get("plan", "gpu" if not self.fits else "none")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_seq_list(text: str) -> list[int]:
    """Sequence lengths from ``32K..1M`` (doubling from the first; the last is always included),
    ``32K,64K,256K`` (as given, sorted) or a single length.

    >>> [fmt_tokens(s) for s in parse_seq_list("32K..256K")]
    ['32K', '64K', '128K', '256K']
    >>> parse_seq_list("64K, 32K")
    [32768, 65536]
    """
    if ".." in text:
        first_text, _, last_text = text.partition("..")
        first, last = parse_seq(first_text), parse_seq(last_text)
        if last < first:
            raise MemoplanError(f"The range '{text}' runs backwards: write the shorter length "
                                f"first, as in 32K..1M.")
        lengths = []
        seq = first
        while seq < last:
            lengths.append(seq)
            seq *= 2
        lengths.append(last)
    else:
        lengths = sorted({parse_seq(part) for part in text.split(",") if part.strip()})
        if not lengths:
            raise MemoplanError("--seq names no length: write 32K..1M or 32K,64K.")
    if len(lengths) > MAX_LENGTHS:
        raise MemoplanError(f"'{text}' gives {len(lengths)} lengths; a sweep takes at most "
                            f"{MAX_LENGTHS}. Write a shorter range.")
    return lengths


def row_from_plan(plan: Plan, *, offload_host_bytes: float | None = None,
                  gpus_sharing_node: int = 1) -> SweepRow:
    """The figures of one solved plan. ``offload_host_bytes`` (per GPU, from
    :func:`offload_all_host_bytes`; ``None``: not checked) and ``gpus_sharing_node`` size
    offload-all's host memory check against the plan's hardware."""
    offloaded = [d.alpha for d in plan.layers if d.mode == "offload"]
    p = plan.predicted
    hw = plan.config["hardware"]
    gpu_mem = hw["gpu_mem_gb"] * 2**30
    fits_by, limits = baseline_fits(p, gpu_mem=gpu_mem, offload_host_bytes=offload_host_bytes,
                                    host_bytes_per_node=hw["host_mem_gb"] * 2**30,
                                    gpus_sharing_node=gpus_sharing_node)
    s = plan.solver
    host_bound = bool(offloaded) and (bool(s.get("host_fallback")) or (
        s.get("alpha_host", 1.0) < 1 and s.get("alpha_host", 1.0) <= s.get("alpha_pcie", 1.0)))
    pcie_bound = p.stall_s > 0 or (bool(offloaded) and s.get("alpha_pcie", 1.0) < 1
                                   and s.get("alpha_pcie", 1.0) < s.get("alpha_host", 1.0))
    fits_by["plan"] = True
    limits["plan"] = "host" if host_bound else "pcie" if pcie_bound else "none"
    return SweepRow(
        seq=int(plan.config["seq"]), tokens_per_gpu=int(plan.config["tokens_per_gpu"]), fits=True,
        alpha=max(offloaded) if offloaded else None,
        host_bytes=sum(d.host_bytes for d in plan.layers), arena_bytes=plan.arena_bytes,
        gpu_total_bytes=p.gpu_bytes["plan"],
        mfu={k: p.mfu[k] for k in STRATEGIES},
        gpu_bytes={k: p.gpu_bytes[k] for k in STRATEGIES},
        fits_by={k: fits_by[k] for k in STRATEGIES}, limits={k: limits[k] for k in STRATEGIES})


def baseline_fits(p: Prediction, *, gpu_mem: float, offload_host_bytes: float | None,
                  host_bytes_per_node: float, gpus_sharing_node: int
                  ) -> tuple[dict[str, bool], dict[str, str]]:
    """Whether keep-all, full recompute and offload-all fit, and what limits them (module
    docstring). ``offload_host_bytes`` is what offload-all pins per GPU: every layer's saved
    tensors, ``num_layers x LayerBytes.total`` (``None``: not checked)."""
    fits, limits = {}, {}
    for k in ("keep_all", "full_recompute", "offload_all"):
        fits[k] = p.gpu_bytes[k] <= gpu_mem
        limits[k] = "none" if fits[k] else "gpu"
    if fits["offload_all"] and offload_host_bytes is not None and \
            offload_host_bytes * gpus_sharing_node > host_bytes_per_node:
        fits["offload_all"], limits["offload_all"] = False, "host"
    elif fits["offload_all"] and \
            p.iteration_s["offload_all"] > p.iteration_s["keep_all"] * (1 + 1e-9):
        limits["offload_all"] = "pcie"
    return fits, limits


def offload_all_host_bytes(profile: Profile, cfg: SolveConfig) -> int:
    """Host memory offload-all pins per GPU: every layer's saved tensors."""
    from memoplan.solve.swap import layer_bytes

    return profile.model.num_layers * layer_bytes(profile, cfg).total


def baseline_prediction(profile: Profile, cfg: SolveConfig) -> Prediction:
    """The baselines' figures at a length whose plan does not fit (no plan to read them from).

    Same formulas as :func:`memoplan.solve.plan.solve_plan`: model states + shared inputs +
    the layers each baseline holds + the larger one-layer transient (forward or backward) + the
    head. The transient is sized by greedy-by-size on level 1's blocks, an upper bound of the
    MIP's peak that the plan would use (so a baseline is never said to fit when it might not).
    ``gpu_bytes`` and ``mfu`` have no ``plan`` key.
    """
    from memoplan.solve.dsa import blocks_from_requests, solve_greedy
    from memoplan.solve.levels import head_bytes, level1_requests
    from memoplan.solve.parallel import state_bytes_per_gpu
    from memoplan.solve.swap import decide_swaps, predict

    n = profile.model.num_layers
    decision = decide_swaps(profile, replace(cfg, keep_last=n))  # baselines ignore keep_last
    base = predict(decision, cfg)
    lb = decision.bytes
    peaks = [solve_greedy(blocks_from_requests(level1_requests(profile, cfg, phase))).peak
             for phase in ("forward", "backward")]
    transient = max(peaks) + head_bytes(profile, cfg)
    states = state_bytes_per_gpu(profile, cfg)
    gpu_bytes = {
        "keep_all": states + lb.shared + n * lb.total + transient,
        "full_recompute": states + lb.shared + n * lb.input + lb.total + transient,
        "offload_all": states + lb.shared + 2 * lb.total + transient,
    }
    return Prediction(**{**base.__dict__, "gpu_bytes": gpu_bytes,
                         "mfu": {k: v for k, v in base.mfu.items() if k != "plan"},
                         "iteration_s": {k: v for k, v in base.iteration_s.items() if k != "plan"}})


def row_without_plan(profile: Profile, cfg: SolveConfig, error: InfeasibleError) -> SweepRow:
    """A length whose plan does not fit: the baselines' figures and the reason."""
    reason = str(error)
    # solve.plan raises two kinds: host memory (check_pinned: "pins ... host memory") or GPU
    limit = "host" if reason.startswith("The plan pins") else "gpu"
    p = baseline_prediction(profile, cfg)
    fits_by, limits = baseline_fits(
        p, gpu_mem=cfg.hardware.gpu_mem_gb * 2**30,
        offload_host_bytes=offload_all_host_bytes(profile, cfg),
        host_bytes_per_node=cfg.hardware.host_mem_gb * 2**30,
        gpus_sharing_node=cfg.gpus_sharing_node)
    return SweepRow(seq=cfg.seq, tokens_per_gpu=cfg.tokens_per_gpu, fits=False, reason=reason,
                    mfu=dict(p.mfu), gpu_bytes=dict(p.gpu_bytes),
                    fits_by={"plan": False, **fits_by}, limits={"plan": limit, **limits})


def run_sweep(profile: Profile, lengths: Iterable[int], settings: Mapping[str, Any], *,
              progress: Callable[[str], None] = lambda m: None) -> list[SweepRow]:
    """Solve ``profile`` at every length with ``SolveConfig(seq=length, **settings)``."""
    rows = []
    for seq in lengths:
        cfg = SolveConfig(seq=seq, **settings)
        label = fmt_tokens(seq)
        try:
            plan = solve_plan(profile, cfg, progress=lambda msg, label=label: progress(f"{label}: {msg}"))
        except InfeasibleError as e:
            progress(f"{label}: sizing the baselines")
            rows.append(row_without_plan(profile, cfg, e))
            continue
        rows.append(row_from_plan(plan, offload_host_bytes=offload_all_host_bytes(profile, cfg),
                                  gpus_sharing_node=cfg.gpus_sharing_node))
    return rows


def longest_fit(rows: Sequence[SweepRow], strategy: str = "plan") -> int | None:
    """The longest sequence length at which ``strategy`` fits, or ``None`` when none does."""
    return max((r.seq for r in rows if _fits(r, strategy)), default=None)


def _fits(row: SweepRow, strategy: str) -> bool:
    if strategy == "plan" or row.fits_by is None:
        return row.fits if strategy == "plan" else False
    return bool(row.fits_by.get(strategy, False))


def strategy_summary(rows: Sequence[SweepRow]) -> dict[str, dict[str, Any]]:
    """Per strategy: the longest length that fits, the first length past it that does not fit
    and what limits it there (``stops_at``, ``stopped_by``; ``None`` when it fits to the end),
    and per length its MFU (``None`` where not predicted), fit and limit."""
    out = {}
    for k in STRATEGIES:
        best = longest_fit(rows, k)
        after = [r for r in rows if not _fits(r, k) and (best is None or r.seq > best)]
        stop = after[0] if after else None
        out[k] = {
            "longest_fit": best,
            "stops_at": stop.seq if stop else None,
            "stopped_by": (stop.limits or {}).get(k, "gpu") if stop else None,
            "seq": [r.seq for r in rows],
            "mfu": [(r.mfu or {}).get(k) for r in rows],
            "fits": [_fits(r, k) for r in rows],
            "limit": [(r.limits or {}).get(k) for r in rows],
        }
    return out
