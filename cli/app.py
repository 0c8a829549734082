"""The ``memoplan`` command line: one small function per command over the library.

Errors of memoplan's own type are printed as one paragraph and exit with their status
(2 bad input, 3 infeasible, 4 solver time-out); nothing else is caught here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console

from memoplan.errors import MemoplanError

# Options shared by `solve` and `sweep` (cli/views.py).
GpusOpt = Annotated[int, typer.Option(help="GPUs in all: dp x cp x tp (FSDP2 over dp x cp).")]
GpusPerNodeOpt = Annotated[Optional[int], typer.Option(
    help="GPUs sharing a node's host memory and PCIe. Default: the hardware's.")]
TpOpt = Annotated[int, typer.Option(
    help="Tensor(+sequence)-parallel degree; planning only (the runtime refuses tp > 1).")]
CpOpt = Annotated[Optional[int], typer.Option(
    help="Context-parallel (ring attention) degree. Default: the GPUs of one node, or "
         "--gpus / --tp / --dp.")]
DpOpt = Annotated[Optional[int], typer.Option(help="Data-parallel degree. Default: --gpus / --tp / --cp.")]
LoadBalanceOpt = Annotated[bool, typer.Option(
    help="Causal context parallel with the sequence cut into 2 x cp chunks (PyTorch's default).")]
RotateOpt = Annotated[str, typer.Option(
    help="How ring attention moves K/V: alltoall, allgather, or auto (the smaller workspace).")]
HwOpt = Annotated[str, typer.Option(
    help="Hardware: a preset (h200, h200-box, h100, a800, a100: 'memoplan.hardware') or a "
         "hardware JSON file ('memoplan calibrate' writes one).")]
PcieOpt = Annotated[Optional[float], typer.Option(help="Pinned D2H GB/s of one GPU.")]
HostMemOpt = Annotated[Optional[float], typer.Option(help="Host memory per node (GiB) for activations.")]
GpuMemOpt = Annotated[Optional[float], typer.Option(help="GPU memory (GiB).")]
PeakOpt = Annotated[Optional[float], typer.Option(help="Dense bf16 TFLOP/s of one GPU.")]
KeepLastOpt = Annotated[Optional[int], typer.Option(
    help="Last layers kept on the GPU (not offloaded). Default: as many as the GPU holds "
         "(all of them when everything fits).")]
StateBytesOpt = Annotated[float, typer.Option(help="Bytes of weights+grads+optimizer per parameter.")]


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Plan activation memory for long-context transformer training.")
console = Console()
err_console = Console(stderr=True)


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except MemoplanError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str], None]]:
    if quiet:
        yield lambda msg: None
        return
    with console.status("starting") as status:
        yield lambda msg: status.update(msg)


@app.callback()
def _root() -> None:
    """memoplan: profile a model, solve a memory plan, emit its runtime, plot it."""


@app.command()
def profile(
    model_file: Annotated[Path, typer.Argument(help="Python file defining build_model() and example_inputs(seq_len).")],
    seq: Annotated[str, typer.Option(help="Largest profiled length; seq/4, seq/2, 3seq/4 are traced too.")] = "512",
    layer: Annotated[Optional[str], typer.Option(help="Class name of the repeated layer (overrides detection).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Cast the model first: float32, bfloat16 or float16.")] = None,
    autocast: Annotated[Optional[str], typer.Option(help="Trace under torch.autocast to this dtype (as training runs).")] = None,
    hw: Annotated[str, typer.Option(help="Hardware preset for the time estimate on a CPU.")] = "h200",
    device: Annotated[str, typer.Option(help="cpu, or cuda to measure times with CUDA events.")] = "cpu",
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the profile JSON.")] = Path("profile.json"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary (for scripts).")] = False,
) -> None:
    """Trace MODEL_FILE, find its repeated layer and profile one layer's activations."""
    from memoplan.jsonio import write_json_atomic
    from memoplan.report import profile_summary
    from memoplan.trace import ProfileConfig, profile_model
    from memoplan.units import parse_seq

    with _user_errors():
        cfg = ProfileConfig(model_file=model_file, seq=parse_seq(seq), layer=layer, dtype=dtype,
                            autocast=autocast, hardware=hw, device=device)
        with _progress(quiet or as_json) as progress:
            result = profile_model(cfg, progress=progress)
        write_json_atomic(output, result.to_json())
    if as_json:
        views.echo_json({**views.profile_facts(result), "file": str(output)})
    elif not quiet:
        console.print(profile_summary(result))
        console.print(f"wrote [bold]{output}[/]")


@app.command()
def solve(
    profile_file: Annotated[Path, typer.Argument(help="profile.json written by 'memoplan profile'.")],
    seq: Annotated[str, typer.Option(help="Sequence length: 131072, 128K or 1M.")] = "128K",
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
    time_limit: Annotated[float, typer.Option(help="Seconds for each of the three MIPs.")] = 20.0,
    alpha: Annotated[Optional[float], typer.Option(help="Force this swap fraction on every offloaded layer.")] = None,
    keep_last: KeepLastOpt = None,
    state_bytes_per_param: StateBytesOpt = 16.0,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the plan JSON.")] = Path("plan.json"),
    emit: Annotated[Optional[Path], typer.Option(help="Also write the generated runtime module here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary (for scripts).")] = False,
) -> None:
    """Choose swap fractions and solve the address plan for PROFILE_FILE at --seq on --gpus."""
    from memoplan.hardware import get_hardware
    from memoplan.emit import emit_module
    from memoplan.jsonio import load_profile, write_json_atomic, write_text_atomic
    from memoplan.report import plan_summary
    from memoplan.solve import SolveConfig, solve_plan
    from memoplan.units import parse_seq

    with _user_errors():
        prof = load_profile(profile_file)
        hardware = get_hardware(hw, pcie_gbps=pcie_gbps, host_mem_gb=host_mem_gb,
                                gpu_mem_gb=gpu_mem_gb, peak_tflops=peak_tflops)
        per_node = hardware.gpus_per_node if gpus_per_node is None else gpus_per_node
        cfg = SolveConfig(seq=parse_seq(seq), gpus=gpus, gpus_per_node=per_node, tp=tp, cp=cp,
                          dp=dp, load_balance=load_balance, rotate_method=rotate_method,
                          hardware=hardware, time_limit=time_limit, alpha=alpha,
                          keep_last=keep_last, state_bytes_per_param=state_bytes_per_param)
        with _progress(quiet or as_json) as progress:
            plan = solve_plan(prof, cfg, progress=progress)
        module = emit_module(plan) if emit else None  # render first: no plan without its module
        write_json_atomic(output, plan.to_json())
        if emit:
            write_text_atomic(emit, module)
    if as_json:
        views.echo_json({**views.plan_facts(plan), "file": str(output)})
    elif not quiet:
        console.print(plan_summary(plan))
        console.print(f"wrote [bold]{output}[/]")


@app.command("emit")
def emit_cmd(
    plan_file: Annotated[Path, typer.Argument(help="plan.json written by 'memoplan solve'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the module.")] = Path("runtime_plan.py"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Write PLAN_FILE as a generated, readable Python runtime module."""
    from memoplan.emit import emit_module
    from memoplan.jsonio import write_text_atomic
    from memoplan.runtime import load_plan

    with _user_errors():
        write_text_atomic(output, emit_module(load_plan(plan_file)))
    if not quiet:
        console.print(f"wrote [bold]{output}[/]")


@app.command("calibrate")
def calibrate_cmd(
    device: Annotated[str, typer.Option(help="cpu, or cuda (cuda:N) to measure a GPU and its host link.")] = "cpu",
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the hardware JSON.")] = Path("hw.json"),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller sizes, fewer repeats: seconds, rougher figures.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Measure this machine's compute, memory and copy rates into a file for solve --hw."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from memoplan.calibrate import FIELDS, calibrate, check_output, write_hardware

    with _user_errors():
        check_output(output)
        columns = (TextColumn("calibrating {task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True, disable=quiet) as bar:
            task = bar.add_task("", total=None)
            hw = calibrate(device, quick=quick, progress=lambda what, done, total: bar.update(
                task, description=what, completed=done, total=total))
        write_hardware(output, hw)
    if not quiet:
        for field in FIELDS:
            console.print(f"{field:<16} {hw[field]}", highlight=False)
        console.print(f"wrote [bold]{output}[/] (how each figure was obtained: its 'sources')")


from memoplan.cli import views  # noqa: E402, F401  (registers plot, show, sweep on ``app``)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="memoplan")


if __name__ == "__main__":
    sys.exit(main())
