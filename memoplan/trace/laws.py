"""Size laws: fit counts measured at a few sequence lengths as polynomials in S."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from memoplan.ir import SizeLaw


def fit_law(seq_lens: Sequence[int], values: Sequence[float], *, max_degree: int = 2) -> SizeLaw:
    """The lowest-degree polynomial (up to ``max_degree``) that reproduces ``values`` exactly.

    Exact means within 1e-9 relative (1e-6 absolute). If none does, the least-squares fit of
    ``max_degree`` is returned with ``exact=False`` and its worst relative error.

    >>> fit_law([64, 128, 192, 256], [1024, 2048, 3072, 4096]).coeffs
    (0.0, 16.0)
    """
    x = np.asarray(seq_lens, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    scale = max(1.0, float(np.abs(y).max(initial=0.0)))
    best = None
    for degree in range(0, min(max_degree, len(x) - 1) + 1):
        # solve in units of the largest length to keep the Vandermonde matrix well conditioned
        coeffs_scaled = np.polynomial.polynomial.polyfit(x / x.max(), y, degree)
        coeffs = tuple(float(c) / float(x.max()) ** i for i, c in enumerate(coeffs_scaled))
        pred = sum(c * x**i for i, c in enumerate(coeffs))
        err = float(np.abs(pred - y).max(initial=0.0))
        tidy = tuple(_tidy(c) for c in coeffs)
        if err <= max(1e-6, 1e-9 * scale):
            return SizeLaw(coeffs=tidy, exact=True, max_rel_error=err / scale)
        best = SizeLaw(coeffs=tidy, exact=False, max_rel_error=err / scale)
    assert best is not None
    return best


def _tidy(c: float) -> float:
    """Round coefficients that are integers up to float noise, so laws read cleanly."""
    r = round(c)
    return float(r) if abs(c - r) <= 1e-6 * max(1.0, abs(c)) else c
