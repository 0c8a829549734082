"""``memoplan sweep``: one plan per sequence length, to find the longest length that fits.

For every length the full solve runs (swap fractions, both levels, the fit check); a length whose
plan does not fit the GPU (:class:`~memoplan.errors.InfeasibleError`) becomes a row with
``fits=False`` and the solver's reason. Nothing here prints: the CLI renders the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from memoplan.errors import InfeasibleError, MemoplanError
from memoplan.ir import Plan, Profile
from memoplan.solve import SolveConfig, solve_plan
from memoplan.units import fmt_tokens, parse_seq

STRATEGIES = ("plan", "keep_all", "full_recompute", "offload_all")
MAX_LENGTHS = 64  # a sweep longer than this is almost surely a typo in --seq


@dataclass(frozen=True, kw_only=True)
class SweepRow:
    """One sequence length of a sweep (bytes per GPU; ``None`` where the plan did not fit).

    ``alpha`` is the swap fraction of the offloaded layers (``None`` when no layer offloads);
    ``mfu`` and ``gpu_bytes`` are the cost model's figures keyed by :data:`STRATEGIES`.
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


def row_from_plan(plan: Plan) -> SweepRow:
    """The figures of one solved plan."""
    offloaded = [d.alpha for d in plan.layers if d.mode == "offload"]
    p = plan.predicted
    return SweepRow(
        seq=int(plan.config["seq"]), tokens_per_gpu=int(plan.config["tokens_per_gpu"]), fits=True,
        alpha=max(offloaded) if offloaded else None,
        host_bytes=sum(d.host_bytes for d in plan.layers), arena_bytes=plan.arena_bytes,
        gpu_total_bytes=p.gpu_bytes["plan"],
        mfu={k: p.mfu[k] for k in STRATEGIES},
        gpu_bytes={k: p.gpu_bytes[k] for k in STRATEGIES})


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
            rows.append(SweepRow(seq=seq, tokens_per_gpu=cfg.tokens_per_gpu, fits=False,
                                 reason=str(e)))
            continue
        rows.append(row_from_plan(plan))
    return rows


def longest_fit(rows: Sequence[SweepRow]) -> int | None:
    """The longest sequence length whose plan fits, or ``None`` when none does."""
    return max((r.seq for r in rows if r.fits), default=None)
