"""Rich summaries of profiles and plans (used by the CLI's commands and ``memoplan show``)."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Group
from rich.table import Table

from memoplan.ir import Plan, Profile
from memoplan.units import fmt_bytes, fmt_seconds


def law_text(coeffs: list[tuple[float, ...]]) -> str:
    """The sum of size laws, as text in S tokens: ``law_text([(48, 6544, 2)]) ==
    '48 + 6,544·S + 2·S²'``."""
    n = max(map(len, coeffs), default=0)
    total = [sum(c[i] for c in coeffs if i < len(c)) for i in range(n)]
    terms = [(f"{x:,.0f}" if x == round(x) else f"{x:,.3g}")
             + (("", "·S", "·S²")[i] if i < 3 else f"·S^{i}")
             for i, x in enumerate(total) if x != 0]
    return " + ".join(terms).replace("+ -", "- ") or "0"


def profile_summary(p: Profile) -> Group:
    """Layer class and count, skeletal bytes by kind (at the profiled length: in all, per token,
    and as a law in S), transient peaks, FLOPs, times."""
    m, L = p.model, p.layer
    head = Table.grid(padding=(0, 2))
    head.add_row("layer", f"{m.layer_class} x {m.num_layers}  ({m.layer_path}, {m.dtype})")
    head.add_row("parameters", f"{fmt_bytes(m.param_bytes_per_layer)} per layer, "
                               f"{fmt_bytes(m.param_bytes_total)} in all")
    head.add_row("profiled at", ", ".join(str(s) for s in p.seq_lens) + " tokens")

    # per kind: tensors, bytes at the profiled length, size law (sum of the tensors' laws)
    kinds: dict[str, list] = defaultdict(lambda: [0, 0, []])
    for t in L.saved:
        row = kinds[f"{t.kind}{' (token-wise)' if t.token_wise else ''}"]
        row[0] += 1
        row[1] += t.bytes
        row[2].append(t.law.coeffs)
    seq = p.seq_len
    saved = Table(title=f"skeletal tensors (saved for backward) at {seq} tokens",
                  title_justify="left", caption=f"bytes/token: bytes at {seq} tokens / {seq}; "
                                                "law: bytes at S tokens")
    saved.add_column("kind")
    for col in ("tensors", "bytes", "bytes/token", "law"):
        saved.add_column(col, justify="right")
    for key, (count, nbytes, laws) in sorted(kinds.items()):
        saved.add_row(key, str(count), fmt_bytes(nbytes), f"{nbytes / seq:,.0f}", law_text(laws))
    layer = [t for t in L.saved if t.kind != "shared"]
    nbytes = sum(t.bytes for t in layer)
    saved.add_row("per layer (no shared)", str(len(layer)), fmt_bytes(nbytes),
                  f"{nbytes / seq:,.0f}", law_text([t.law.coeffs for t in layer]), style="bold")

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


def parallel_lines(plan: Plan) -> list[tuple[str, str]]:
    """How the plan splits the job: degrees, tokens per GPU, ring attention and its workspace,
    FSDP2's headroom (plans from before these were recorded show what they have)."""
    c = plan.config
    tp, cp = c["tp"], c["cp"]
    dp = c.get("dp", c["gpus"] // (tp * cp))
    lines = [("parallel", f"dp {dp} x cp {cp} x tp {tp}: {c['tokens_per_gpu']} tokens per GPU"
              + ("" if c.get("tp_runtime_supported", tp == 1)
                 else f" (tp {tp} planned only: the runtime refuses it)"))]
    if cp > 1 and "rotate_method" in c:
        ring = f"rotate {c['rotate_method']}, load balancing {'on' if c['load_balance'] else 'off'}"
        workspace = c.get("ring_workspace", {})
        for phase, parts in workspace.items():
            ring += (f"; {phase} {fmt_bytes(sum(parts.values()))} ("
                     + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items()) + ")")
        lines.append(("ring attention", ring + (" per attention op" if workspace else "")))
    fsdp = {k: v for k, v in plan.solver.get("pool_parts", {}).items() if k.startswith("fsdp_")}
    if fsdp:
        lines.append(("FSDP2", f"states sharded over {dp * cp} ranks; headroom " + ", ".join(
            f"{k[5:].replace('_', ' ')} {fmt_bytes(v)}" for k, v in fsdp.items())))
    return lines


def hardware_text(hw: dict) -> str:
    """The hardware a plan assumed (its ``config.hardware``), in one line. Plans from before
    the per-class cost model show what they have (``efficiency``, ``pcie_gbps``)."""
    def figure(key: str, fmt: str) -> str | None:
        return fmt.format(hw[key]) if isinstance(hw.get(key), (int, float)) else None

    parts = [figure("gpus_per_node", "{:g} GPUs per node"), figure("gpu_mem_gb", "{:g} GiB GPU"),
             figure("host_mem_gb", "{:g} GiB host per node"),
             figure("peak_tflops", "peak {:g} TFLOP/s"), figure("matmul_tflops", "matmul {:g}"),
             figure("attn_fwd_tflops", "attention forward {:g}"),
             figure("attn_bwd_tflops", "backward {:g}"), figure("efficiency", "efficiency {:g}"),
             figure("hbm_gbps", "HBM {:g} GB/s"),
             figure("d2h_gbps", "D2H {:g}") or figure("pcie_gbps", "PCIe {:g} GB/s"),
             figure("h2d_gbps", "H2D {:g}"), figure("duplex_gbps", "both {:g} GB/s"),
             figure("pcie_node_gbps", "node {:g} GB/s"),
             figure("pin_s_per_gib", "pinning {:g} s/GiB")]
    return f"{hw.get('name', '?')}: " + ", ".join(p for p in parts if p)


def plan_summary(plan: Plan) -> Group:
    """Per-layer decisions, arena against lower bound and baselines, predicted time and MFU."""
    c = plan.config
    head = Table.grid(padding=(0, 2))
    head.add_row("config", f"{c['seq']} tokens on {c['gpus']} GPUs, {c['hardware']['name']}")
    head.add_row("hardware", hardware_text(c["hardware"]))
    for key, text in parallel_lines(plan):
        head.add_row(key, text)
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
    for col in ("level", "n", "plan", "bound", "ratio", "greedy", "caching", "status", "s"):
        levels.add_column(col, justify="left" if col in ("level", "status") else "right")
    mib = lambda x: f"{x / 2**20:,.1f}"  # noqa: E731
    for name, lp in plan.levels.items():
        levels.add_row(name, str(len(lp.offsets)), mib(lp.peak), mib(lp.lower_bound),
                       f"{lp.ratio:.3f}", mib(lp.greedy_peak), mib(lp.caching_reserved_peak),
                       lp.status + (f" {lp.gap:.1%}" if lp.gap > 0 else ""), f"{lp.seconds:.1f}")
    levels.caption = ("plan: planned peak; bound: largest live total; greedy: greedy-by-size;\n"
                      "caching: PyTorch caching allocator's reserved peak (simulated)"
                      + "".join(f"\n{name}: offsets by {lp.method}; {lp.note}"
                                for name, lp in plan.levels.items() if lp.note))
    levels.caption_justify = "left"
    p = plan.predicted
    pred = Table(title="predicted per iteration (cost model)", title_justify="left")
    for col in ("strategy", "seconds", "MFU", "GPU memory"):
        pred.add_column(col, justify="left" if col == "strategy" else "right")
    for k in ("plan", "keep_all", "full_recompute", "offload_all"):
        if k in p.iteration_s:  # plans from before offload-all was predicted have no row
            pred.add_row(k.replace("_", " "), f"{p.iteration_s[k]:.3f}", f"{p.mfu[k]:.3f}",
                         fmt_bytes(p.gpu_bytes.get(k, 0)))
    tail = Table.grid(padding=(0, 2))
    tail.add_row("arena", f"{fmt_bytes(plan.arena_bytes)} + model states "
                          f"{fmt_bytes(plan.state_bytes)} + outside the arena (embedding output, "
                          f"logits, loss, kernel workspaces, FSDP2 buffers) "
                          f"{fmt_bytes(plan.pool_bytes)}; host memory "
                          f"{fmt_bytes(host_total)} per GPU")
    tail.add_row("layer", f"forward {fmt_seconds(p.forward_s)} (of which token-wise "
                          f"{fmt_seconds(p.token_wise_forward_s)}), backward "
                          f"{fmt_seconds(p.backward_s)}, copy {fmt_seconds(p.copy_s)}")
    if plan.solver.get("pin_s"):
        tail.add_row("pinning", f"{fmt_seconds(plan.solver['pin_s'])} once, for the host slab")
    for note in plan.notes:
        tail.add_row("note", note)
    return Group(head, modes, levels, pred, tail)
