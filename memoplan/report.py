"""Rich summaries of profiles and plans (used by the CLI's commands and ``memoplan show``)."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Group
from rich.table import Table

from memoplan.ir import Plan, Profile
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


def plan_summary(plan: Plan) -> Group:
    """Per-layer decisions, arena against lower bound and baselines, predicted time and MFU."""
    c = plan.config
    head = Table.grid(padding=(0, 2))
    head.add_row("config", f"{c['seq']} tokens on {c['gpus']} GPUs (tp {c['tp']}, cp {c['cp']}: "
                           f"{c['tokens_per_gpu']} tokens per GPU), {c['hardware']['name']}")
    modes = Table(title="layers", title_justify="left")
    for col in ("layers", "mode", "alpha", "swapped", "recomputed", "host"):
        modes.add_column(col, justify="right" if col not in ("mode",) else "left")
    groups: list[list] = []
    for d in plan.layers:
        key = (d.mode, round(d.alpha, 4), d.swapped_bytes, d.recomputed_bytes, d.host_bytes)
        if groups and groups[-1][0] == key:
            groups[-1][2] = d.index
        else:
            groups.append([key, d.index, d.index])
    for (mode, alpha, sw, rc, host), first, last in groups:
        modes.add_row(f"{first}-{last}" if last > first else str(first), mode, f"{alpha:.3f}",
                      fmt_bytes(sw), fmt_bytes(rc), fmt_bytes(host))
    host_total = sum(d.host_bytes for d in plan.layers)

    levels = Table(title="address plan (MiB)", title_justify="left")
    for col in ("level", "n", "MIP", "bound", "ratio", "greedy", "caching", "status", "s"):
        levels.add_column(col, justify="left" if col in ("level", "status") else "right")
    mib = lambda x: f"{x / 2**20:,.1f}"  # noqa: E731
    for name, lp in plan.levels.items():
        levels.add_row(name, str(len(lp.offsets)), mib(lp.peak), mib(lp.lower_bound),
                       f"{lp.ratio:.3f}", mib(lp.greedy_peak), mib(lp.caching_reserved_peak),
                       lp.status + (f" {lp.gap:.1%}" if lp.gap > 0 else ""), f"{lp.seconds:.1f}")
    levels.caption = ("MIP: planned peak; bound: largest live total; greedy: greedy-by-size;\n"
                      "caching: PyTorch caching allocator's reserved peak (simulated)")
    p = plan.predicted
    pred = Table(title="predicted per iteration (cost model)", title_justify="left")
    for col in ("strategy", "seconds", "MFU", "GPU memory"):
        pred.add_column(col, justify="left" if col == "strategy" else "right")
    for k in ("plan", "keep_all", "full_recompute"):
        pred.add_row(k.replace("_", " "), f"{p.iteration_s[k]:.3f}", f"{p.mfu[k]:.3f}",
                     fmt_bytes(p.gpu_bytes.get(k, 0)))
    tail = Table.grid(padding=(0, 2))
    tail.add_row("arena", f"{fmt_bytes(plan.arena_bytes)} + model states "
                          f"{fmt_bytes(plan.state_bytes)} + outside the arena (embedding output, "
                          f"logits, loss, kernel workspaces) {fmt_bytes(plan.pool_bytes)}; host memory "
                          f"{fmt_bytes(host_total)} per GPU")
    tail.add_row("layer", f"forward {fmt_seconds(p.forward_s)}, backward "
                          f"{fmt_seconds(p.backward_s)}, copy {fmt_seconds(p.copy_s)}")
    for note in plan.notes:
        tail.add_row("note", note)
    return Group(head, modes, levels, pred, tail)
