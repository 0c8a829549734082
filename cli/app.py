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
    hw: Annotated[str, typer.Option(help="Hardware preset for the time estimate on a CPU.")] = "h200",
    device: Annotated[str, typer.Option(help="cpu, or cuda to measure times with CUDA events.")] = "cpu",
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the profile JSON.")] = Path("profile.json"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Trace MODEL_FILE, find its repeated layer and profile one layer's activations."""
    from memoplan.jsonio import write_json_atomic
    from memoplan.report import profile_summary
    from memoplan.trace import ProfileConfig, profile_model
    from memoplan.units import parse_seq

    with _user_errors():
        cfg = ProfileConfig(model_file=model_file, seq=parse_seq(seq), layer=layer, dtype=dtype,
                            hardware=hw, device=device)
        with _progress(quiet) as progress:
            result = profile_model(cfg, progress=progress)
        write_json_atomic(output, result.to_json())
    if not quiet:
        console.print(profile_summary(result))
        console.print(f"wrote [bold]{output}[/]")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="memoplan")


if __name__ == "__main__":
    sys.exit(main())
