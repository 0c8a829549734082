"""``memoplan plot``, ``memoplan show`` and ``memoplan sweep`` (registered on the main app)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from memoplan.cli.app import (CpOpt, DpOpt, GpuMemOpt, GpusOpt, GpusPerNodeOpt, HostMemOpt, HwOpt,
                               KeepLastOpt, LoadBalanceOpt, PcieOpt, PeakOpt, RotateOpt,
                               StateBytesOpt, TpOpt, _progress, _user_errors, app, console)
from memoplan.ir import PLAN_SCHEMA, PROFILE_SCHEMA, Plan, Profile
from memoplan.jsonio import load_plan, load_profile

QUIET = typer.Option("--quiet", "-q", help="Print nothing but errors.")
AS_JSON = typer.Option("--json", help="Print a JSON summary instead of tables (for scripts).")


def _schema_of(path: Path) -> str | None:
    """The ``schema`` field of a JSON file, or None when it has none or cannot be read (the
    reader that follows then says what is wrong with it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    schema = data.get("schema") if isinstance(data, dict) else None
    return schema if isinstance(schema, str) else None


def echo_json(data: Any) -> None:
    """One line of JSON on stdout."""
    typer.echo(json.dumps(data))


# ---- plot ------------------------------------------------------------------------------------

@app.command()
def plot(
    plan_file: Annotated[Path, typer.Argument(help="plan.json written by 'memoplan solve'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the PNGs.")] = Path("plots"),
    snapshot: Annotated[Optional[Path], typer.Option(
        help="A torch.cuda.memory._dump_snapshot() pickle to draw beside the plan.")] = None,
    quiet: Annotated[bool, QUIET] = False,
) -> None:
    """Draw PLAN_FILE as PNGs: address plans, the caching allocator beside them, the timeline."""
    from memoplan.plot import load_snapshot, plan_figures, write_pngs

    with _user_errors():
        plan = load_plan(plan_file)
        snap = load_snapshot(snapshot) if snapshot is not None else None
        with _progress(quiet) as progress:
            progress("drawing the plan")
            figures = plan_figures(plan, snap)
            progress(f"writing {len(figures)} PNGs")
            paths = write_pngs(figures, output)
    if not quiet:
        for path in paths:
            console.print(str(path), highlight=False, soft_wrap=True)


# ---- show ------------------------------------------------------------------------------------

def profile_facts(p: Profile) -> dict[str, Any]:
    """The figures of a profile that scripts want, as plain JSON data."""
    saved: Counter[str] = Counter()        # linear coefficient of the size laws
    saved_bytes: Counter[str] = Counter()  # bytes at seq_len (quadratic parts included)
    for t in p.layer.saved:
        key = f"{t.kind}_token_wise" if t.token_wise else t.kind
        saved[key] += t.bytes_per_token
        saved_bytes[key] += t.bytes
    L = p.layer
    return {
        "kind": "profile", "schema": p.schema, "hash": p.hash,
        "layer_class": p.model.layer_class, "layer_path": p.model.layer_path,
        "num_layers": p.model.num_layers, "dtype": p.model.dtype,
        "param_bytes_total": p.model.param_bytes_total, "seq_len": p.seq_len,
        "seq_lens": list(p.seq_lens), "saved_bytes_per_token": dict(saved),
        "saved_bytes_per_token_per_layer": sum(t.bytes_per_token for t in L.saved
                                               if t.kind != "shared"),
        "saved_bytes": dict(saved_bytes),
        "saved_bytes_per_layer": sum(t.bytes for t in L.saved if t.kind != "shared"),
        "peak_bytes": {"forward": L.peak_forward, "backward": L.peak_backward},
        "requests": {"forward": len(L.requests_forward), "backward": len(L.requests_backward)},
        "segments": len(L.segments), "mixing_ops": list(L.mixing_ops),
        "flops": {"forward": L.flops_forward.total, "backward": L.flops_backward.total},
        "time_s": {"forward": L.time_forward_s, "backward": L.time_backward_s},
        "time_source": p.time_source, "hardware": p.hardware, "notes": list(p.notes),
    }


def plan_facts(plan: Plan) -> dict[str, Any]:
    """The figures of a plan that scripts want, as plain JSON data."""
    c, p = plan.config, plan.predicted
    offloaded = [d.alpha for d in plan.layers if d.mode == "offload"]
    return {
        "kind": "plan", "schema": plan.schema, "layer_class": plan.layer_class,
        "seq": c["seq"], "gpus": c["gpus"], "tp": c["tp"], "cp": c["cp"],
        "dp": c.get("dp", c["gpus"] // (c["tp"] * c["cp"])),
        "tokens_per_gpu": c["tokens_per_gpu"], "hardware": c["hardware"]["name"],
        "hardware_figures": {k: v for k, v in c["hardware"].items()
                             if k not in ("name", "sources")},
        "load_balance": c.get("load_balance"), "rotate_method": c.get("rotate_method"),
        "ring_workspace": c.get("ring_workspace", {}),
        "tp_runtime_supported": c.get("tp_runtime_supported", c["tp"] == 1),
        "modes": dict(Counter(d.mode for d in plan.layers)),
        "alpha": max(offloaded) if offloaded else None,
        "host_bytes_per_gpu": sum(d.host_bytes for d in plan.layers),
        "arena_bytes": plan.arena_bytes, "lower_bound_bytes": plan.lower_bound_bytes,
        "state_bytes": plan.state_bytes, "pool_bytes": plan.pool_bytes,
        "pool_parts": plan.solver.get("pool_parts", {}),
        "levels": {name: {"tensors": len(lp.offsets), "peak": lp.peak,
                          "lower_bound": lp.lower_bound, "ratio": lp.ratio,
                          "greedy_peak": lp.greedy_peak,
                          "caching_reserved_peak": lp.caching_reserved_peak,
                          "status": lp.status, "gap": lp.gap, "method": lp.method,
                          "note": lp.note}
                   for name, lp in plan.levels.items()},
        "predicted": {"iteration_s": p.iteration_s, "mfu": p.mfu, "gpu_bytes": p.gpu_bytes,
                      "stall_s": p.stall_s, "recompute_s": p.recompute_s,
                      "pin_s": plan.solver.get("pin_s")},
        "notes": list(plan.notes),
    }


@app.command()
def show(
    file: Annotated[Path, typer.Argument(help="A profile.json or plan.json written by memoplan.")],
    as_json: Annotated[bool, AS_JSON] = False,
) -> None:
    """Print the summary of a profile or a plan (told apart by its 'schema' field)."""
    from memoplan.report import plan_summary, profile_summary

    with _user_errors():
        schema = _schema_of(file) or ""
        if schema.startswith(PLAN_SCHEMA.split("/")[0] + "/"):
            plan = load_plan(file)
            facts, summary = plan_facts(plan), plan_summary(plan)
        else:  # a profile, or a file that is neither: read_json then says what is wrong
            known = schema.startswith(PROFILE_SCHEMA.split("/")[0] + "/")
            prof = load_profile(file, what="profile" if known else "profile or plan")
            facts, summary = profile_facts(prof), profile_summary(prof)
    if as_json:
        echo_json(facts)
    else:
        console.print(summary)


# ---- sweep -----------------------------------------------------------------------------------

LIMIT_NAMES = {"gpu": "GPU", "host": "host", "pcie": "PCIe", "none": "none"}
STRATEGY_NAMES = {"plan": "plan", "keep_all": "keep all", "full_recompute": "full recompute",
                  "offload_all": "offload all"}


def _sweep_table(rows: list) -> Table:
    """The sweep's rows as a rich table (memory in GiB per GPU, fits 80 columns): the plan's
    figures, every strategy's MFU (x: does not fit) and what limits the plan."""
    from memoplan.units import fmt_tokens

    table = Table(title="sweep: GiB per GPU; predicted MFU of the plan, keep-all, full "
                        "recompute and offload-all (x: does not fit); limit: what holds the "
                        "plan back (GPU/host memory, PCIe)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("seq", "tok\n/GPU", "alpha", "host\nGiB", "GPU\nGiB", "MFU\nplan",
                "MFU\nkeep", "MFU\nrecomp", "MFU\noffload", "limit"):
        table.add_column(col, justify="left" if col == "limit" else "right")
    gib = lambda n: f"{n / 2**30:,.1f}"  # noqa: E731

    def mfu(r, k: str) -> str:
        value = (r.mfu or {}).get(k)
        text = "-" if value is None else f"{value:.3f}"
        return text if (r.fits_by or {"plan": r.fits}).get(k) else f"[dim]{text}[/][red]x[/]"

    for r in rows:
        head = (fmt_tokens(r.seq), fmt_tokens(r.tokens_per_gpu))
        limit = LIMIT_NAMES.get(r.limit, r.limit)
        limit = f"[red]{limit}[/]" if not r.fits else limit
        mfus = [mfu(r, k) for k in ("plan", "keep_all", "full_recompute", "offload_all")]
        if not r.fits:
            table.add_row(*head, "-", "-", "-", *mfus, limit)
            continue
        table.add_row(*head, "-" if r.alpha is None else f"{r.alpha:.2f}", gib(r.host_bytes),
                      gib(r.gpu_total_bytes), *mfus, limit)
    return table


def _longest_lines(summary: dict) -> list[str]:
    """One line per strategy: its longest fitting length and what stops it after."""
    from memoplan.units import fmt_tokens

    lines = ["longest sequence that fits:"]
    for k, info in summary.items():
        best = info["longest_fit"]
        text = f"[bold]{fmt_tokens(best)}[/] ({best:,} tokens)" if best else "[red]none[/]"
        if info["stops_at"] is not None:
            text += (f"; at {fmt_tokens(info['stops_at'])} "
                     f"{LIMIT_NAMES.get(info['stopped_by'], info['stopped_by'])} memory is the "
                     f"limit".replace("PCIe memory", "PCIe"))
        lines.append(f"  {STRATEGY_NAMES[k] + ':':<16}{text}")
    return lines


@app.command()
def sweep(
    profile_file: Annotated[Path, typer.Argument(help="profile.json written by 'memoplan profile'.")],
    seq: Annotated[str, typer.Option(help="Lengths: 32K..1M (doubling) or a list 32K,64K.")] = "32K..1M",
    gpus: GpusOpt = 1,
    gpus_per_node: GpusPerNodeOpt = None,
    tp: TpOpt = 1,
    cp: CpOpt = None,
    dp: DpOpt = None,
    load_balance: LoadBalanceOpt = True,
    rotate_method: RotateOpt = "auto",
    hw: HwOpt = "h200",
    pcie_gbps: PcieOpt = None,
    host_mem_gb: HostMemOpt = None,
    gpu_mem_gb: GpuMemOpt = None,
    peak_tflops: PeakOpt = None,
    time_limit: Annotated[float, typer.Option(help="Seconds for each MIP of each length.")] = 5.0,
    keep_last: KeepLastOpt = None,
    state_bytes_per_param: StateBytesOpt = 16.0,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Folder for sweep.png.")] = None,
    plot_file: Annotated[Optional[Path], typer.Option(
        "--plot", help="Draw the sweep into this PNG: MFU per strategy, where each stops "
                       "fitting and why.")] = None,
    as_json: Annotated[bool, AS_JSON] = False,
    quiet: Annotated[bool, QUIET] = False,
) -> None:
    """Solve PROFILE_FILE at each --seq length and report, per strategy (plan, keep-all, full
    recompute, offload-all), which lengths fit, at what MFU, and what limits them."""
    from memoplan.hardware import get_hardware
    from memoplan.sweep import longest_fit, parse_seq_list, run_sweep, strategy_summary
    from memoplan.units import fmt_tokens

    with _user_errors():
        prof = load_profile(profile_file)
        lengths = parse_seq_list(seq)
        hardware = get_hardware(hw, pcie_gbps=pcie_gbps, host_mem_gb=host_mem_gb,
                                gpu_mem_gb=gpu_mem_gb, peak_tflops=peak_tflops)
        per_node = hardware.gpus_per_node if gpus_per_node is None else gpus_per_node
        settings = dict(gpus=gpus, gpus_per_node=per_node, tp=tp, cp=cp, dp=dp,
                        load_balance=load_balance, rotate_method=rotate_method, hardware=hardware,
                        time_limit=time_limit, keep_last=keep_last,
                        state_bytes_per_param=state_bytes_per_param)
        with _progress(quiet or as_json) as progress:
            rows = run_sweep(prof, lengths, settings, progress=progress)
        pictures = []
        if output is not None or plot_file is not None:
            from memoplan.errors import MemoplanError
            from memoplan.plot import sweep_strategies_figure, write_pngs

            title = (f"{prof.model.layer_class} x {prof.model.num_layers} on {gpus} GPUs "
                     f"({hardware.name})")
            figure = sweep_strategies_figure(rows, gpu_mem_bytes=hardware.gpu_mem_gb * 2**30,
                                             title=title)
            if output is not None:
                pictures += write_pngs({"sweep": figure}, output)
            if plot_file is not None:
                try:
                    if plot_file.parent != Path(""):
                        plot_file.parent.mkdir(parents=True, exist_ok=True)
                    figure.savefig(plot_file, dpi=110, format="png")
                except OSError as e:
                    raise MemoplanError(f"Cannot write the picture '{plot_file}' "
                                        f"({e.strerror or e}). Pick another --plot file.") from e
                pictures.append(plot_file)
    best = longest_fit(rows)
    summary = strategy_summary(rows)
    if as_json:
        echo_json({"rows": [r.to_json() for r in rows], "longest_fit": best,
                   "strategies": summary})
        return
    if quiet:
        return
    console.print(_sweep_table(rows))
    misses = [r for r in rows if not r.fits]
    if misses:
        console.print(f"[dim]{fmt_tokens(misses[0].seq)}: {misses[0].reason}[/]", highlight=False)
    for line in _longest_lines(summary):
        console.print(line, highlight=False)
    for picture in pictures:
        console.print(str(picture), highlight=False, soft_wrap=True)
