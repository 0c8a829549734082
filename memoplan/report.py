"""Rich summaries of profiles and plans (used by the CLI's commands and ``memoplan show``)."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Group
from rich.table import Table

from memoplan.ir import Profile
from memoplan.units import fmt_bytes, fmt_seconds


def profile_summary(p: Profile) -> Group:
    """Layer class and count, skeletal bytes per token by kind, transient peaks, FLOPs, times."""
    m, L = p.model, p.layer
    head = Table.grid(padding=(0, 2))
    head.add_row("layer", f"{m.layer_class} x {m.num_layers}  ({m.layer_path}, {m.dtype})")
    head.add_row("parameters", f"{fmt_bytes(m.param_bytes_per_layer)} per layer, "
                               f"{fmt_bytes(m.param_bytes_total)} in all")
    head.add_row("profiled at", ", ".join(str(s) for s in p.seq_lens) + " tokens")

    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for t in L.saved:
        key = f"{t.kind}{' (token-wise)' if t.token_wise else ''}"
        kinds[key][0] += t.bytes_per_token
        kinds[key][1] += t.bytes
        kinds[key][2] += 1
    saved = Table(title="skeletal tensors (saved for backward)", title_justify="left")
    saved.add_column("kind")
    saved.add_column("tensors", justify="right")
    saved.add_column("bytes/token", justify="right")
    saved.add_column(f"bytes at {p.seq_len}", justify="right")
    for key, (bpt, nbytes, count) in sorted(kinds.items()):
        saved.add_row(key, str(count), f"{bpt:,.0f}", fmt_bytes(nbytes))
    per_layer = sum(t.bytes_per_token for t in L.saved if t.kind != "shared")
    saved.add_row("per layer (shared counted apart)", "", f"{per_layer:,.0f}", "", style="bold")

    other = Table.grid(padding=(0, 2))
    other.add_row("transient peak", f"forward {fmt_bytes(L.peak_forward)}, backward "
                                    f"{fmt_bytes(L.peak_backward)} (live bytes, at {p.seq_len})")
    other.add_row("requests", f"forward {len(L.requests_forward)}, backward "
                              f"{len(L.requests_backward)}")
    other.add_row("segments", f"{len(L.segments)} token-wise, split by "
                              f"{', '.join(L.mixing_ops) or 'no mixing op'}")
    for phase, f in (("forward", L.flops_forward), ("backward", L.flops_backward)):
        other.add_row(f"{phase} FLOPs", f"{f.total:.3e} ({f.token_wise:.3e} token-wise, "
                                        f"{f.mixing:.3e} mixing)")
    other.add_row("time", f"forward {fmt_seconds(L.time_forward_s)}, backward "
                          f"{fmt_seconds(L.time_backward_s)} ({p.time_source}"
                          f"{', ' + p.hardware + ' preset' if p.time_source == 'estimated' else ''})")
    for note in p.notes:
        other.add_row("note", note)
    return Group(head, saved, other)
