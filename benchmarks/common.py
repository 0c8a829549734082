"""What the benchmark scripts share: the layer stack they train, its profile and plans, the host
memory a plan may pin on this machine, and the bytes the runtime's programs keep.

The stack is ``stack_model.py``: the llama example's decoder layers alone (preset and layer count
from ``MEMOPLAN_PRESET`` / ``MEMOPLAN_LAYERS``, set here by :func:`load_example`).
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import json
import os
import sys
import types
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STACK_FILE = ROOT / "benchmarks" / "stack_model.py"
GiB = 2**30


def load_example(preset: str, layers: int):
    """The llama example with ``layers`` layers of the preset's size (no embedding is used)."""
    os.environ["MEMOPLAN_PRESET"] = preset
    os.environ["MEMOPLAN_LAYERS"] = str(layers)
    spec = importlib.util.spec_from_file_location("bench_llama", ROOT / "examples" / "llama" /
                                                  "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_inputs(mod, seq: int, device: torch.device):
    """Hidden states of ``seq`` tokens and the RoPE tables, on ``device``."""
    cfg = mod.config()
    cos, sin = mod.rope_cos_sin(seq, cfg.dim // cfg.n_heads, cfg.rope_theta, device, cfg.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, seq, cfg.dim, dtype=cfg.dtype, device=device, generator=gen)
    return x, cos, sin


def default_profile_seq(preset: str) -> int:
    return 128 if preset == "tiny" else 1024


def stack_profile(device: str, seq: int, path: Path | None = None):
    """The stack's profile (``MEMOPLAN_PRESET``/``MEMOPLAN_LAYERS`` as set by
    :func:`load_example`), traced on ``device`` at ``seq`` tokens; read from ``path`` when that
    file exists (written by an earlier run with the same preset, layers, device and length),
    else written there, so that several scripts of one GPU session profile once."""
    from memoplan import jsonio
    from memoplan.trace import ProfileConfig, profile_model

    if path is not None and path.exists():
        return jsonio.load_profile(path)
    prof = profile_model(ProfileConfig(model_file=STACK_FILE, seq=seq, device=device))
    if path is not None:
        jsonio.write_json_atomic(path, prof.to_json())
    return prof


def add_plan_options(ap) -> None:
    """The options every benchmark that profiles the stack and solves a plan takes."""
    ap.add_argument("--state-bytes", type=float, default=4.0,
                    help="bytes per parameter of model states the plan assumes (4: bf16 weights "
                         "and gradients, no optimizer)")
    ap.add_argument("--host-mem-gb", type=float, default=None,
                    help="host memory the plans may fill, GiB (default: the h200 preset's, or "
                         "0.8 x MemAvailable when that is less)")
    ap.add_argument("--profile-seq", type=int, default=None)
    ap.add_argument("--profile", type=Path, default=None,
                    help="read the stack's profile from this file if it exists, else write it")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per MIP")


def mem_available_gib() -> float | None:
    """``MemAvailable`` of /proc/meminfo in GiB (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return None


def default_host_mem_gb(preset_gb: float) -> float:
    """Host memory a plan may fill on this machine: the hardware preset's figure, or 0.8 x the
    memory available now when that is less (pinning more than the box has fails)."""
    avail = mem_available_gib()
    return preset_gb if avail is None else min(preset_gb, 0.8 * avail)


def solve(prof, seq: int, host_mem_gb: float | None, time_limit: float, **config):
    """A plan for ``seq`` tokens on one H200 whose host memory is ``host_mem_gb`` GiB (default:
    :func:`default_host_mem_gb`); ``config``: other :class:`SolveConfig` fields."""
    from memoplan.hardware import get_hardware
    from memoplan.solve import SolveConfig, solve_plan

    if host_mem_gb is None:
        host_mem_gb = default_host_mem_gb(get_hardware("h200").host_mem_gb)
    hw = get_hardware("h200", host_mem_gb=host_mem_gb)
    return solve_plan(prof, SolveConfig(seq=seq, hardware=hw, time_limit=time_limit, **config))


def write_plan(plan, path: Path) -> Path:
    path.write_text(json.dumps(plan.to_json()))
    return path


def trace_bytes(model: torch.nn.Module) -> int:
    """Bytes of real (not fake, not meta) tensor storages that the runtime's layer programs keep
    alive, the model's own parameters and buffers aside: everything reachable from the programs
    (functions through their closures and defaults only, not their globals). The programs are
    traced on fake tensors, so this should be 0; before, each kept real clones of the layer's
    parameters and inputs and a full-size random output gradient."""
    gc.collect()
    own = {t.untyped_storage().data_ptr()
           for t in itertools.chain(model.parameters(), model.buffers())}
    skip = (type, types.ModuleType, str, bytes, int, float, bool, type(None))
    storages: dict[int, int] = {}
    seen: set[int] = set()
    todo = list(model._memoplan_runner.programs.values())  # noqa: SLF001
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not isinstance(obj, FakeTensor) and obj.device.type != "meta" \
                    and obj.layout == torch.strided:
                st = obj.untyped_storage()
                if st.data_ptr() not in own:
                    storages[st.data_ptr()] = st.nbytes()
            continue
        if isinstance(obj, types.FunctionType):
            todo.extend(c.cell_contents for c in obj.__closure__ or () if _filled(c))
            todo.extend(obj.__defaults__ or ())
            continue
        todo.extend(gc.get_referents(obj))
    return sum(storages.values())


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def gib(v) -> str:
    """Bytes as GiB with two decimals; "n/a" for what was not measured."""
    return f"{v / GiB:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"
