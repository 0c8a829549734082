"""Parsing and printing sizes and sequence lengths."""

from __future__ import annotations

import re

from memoplan.errors import MemoplanError

_SUFFIX = {"": 1, "K": 1024, "M": 1024**2}


def parse_seq(text: str | int) -> int:
    """A sequence length such as ``131072``, ``128K`` or ``1M`` (K = 1024 tokens).

    >>> parse_seq("1M"), parse_seq("512K"), parse_seq("131072")
    (1048576, 524288, 131072)
    """
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
        if not m:
            raise MemoplanError(f"Cannot read the sequence length '{text}': write a whole number of "
                                f"tokens such as 131072, 128K or 1M (K = 1024).")
        value = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value <= 0:
        raise MemoplanError(f"The sequence length must be positive, got {text}.")
    return value


def fmt_bytes(n: float) -> str:
    """Bytes in binary units: ``fmt_bytes(3 * 2**30) == '3.00 GiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_tokens(n: int) -> str:
    """``fmt_tokens(1048576) == '1M'``, ``fmt_tokens(131072) == '128K'``."""
    if n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n % 2**10 == 0:
        return f"{n // 2**10}K"
    return str(n)


def fmt_seconds(s: float) -> str:
    """``fmt_seconds(0.0021) == '2.10 ms'``."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.2f} {unit}"
    return f"{s * 1e9:.1f} ns"
