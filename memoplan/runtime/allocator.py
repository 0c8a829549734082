"""Planned addresses for a layer's transient tensors: a process-wide plan-replaying allocator.

PyTorch lets one allocator serve every CUDA tensor of a process
(``torch.cuda.memory.change_current_allocator``), and only if it is installed before the first
CUDA allocation (see ``shared/reference/allocator-facts.md``). Training scripts therefore start
with::

    import memoplan.runtime
    memoplan.runtime.install_allocator()   # first line, before any tensor is put on the GPU

The allocator (``csrc/plan_allocator.cpp``, built with g++ against the CUDA runtime at first
use and cached) serves everything from CUDA's stream-ordered pool, except during a planned
phase: while the runtime replays layer i's forward or backward graph on the compute stream,
the phase's requests get the plan's addresses in the arena (level-1 offsets inside the layer's
``fwd[i]``/``bwd[i]`` block; the forward's saved tensors inside its ``round[i]`` block), and
while it recomputes layer i's dropped tokens, first-fit inside its ``recompute[i]`` block (no
trace lists those requests). A request that does not match the plan (other size, slot still
in use, unplanned workspace, a full block) goes to the pool and is counted: ``stats()``
reports divergence instead of hiding it. No address range is handed out twice while live,
whatever the request stream does.

Without the allocator the runtime still runs (its own buffers may still use the arena), with
transients from PyTorch's caching allocator.

Status: the replay logic is tested on a CPU (``-DMEMOPLAN_HOST_BACKEND`` build, driven through
ctypes); the CUDA build and its use in training have not run on a GPU yet.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from memoplan.errors import MemoplanError

SOURCE = Path(__file__).with_name("csrc") / "plan_allocator.cpp"
STATS = ("planned", "shifted", "unplanned", "outside", "pool_bytes", "pool_peak",
         "arena_live", "arena_peak", "arena_allocations", "in_block")

_installed: PlanAllocator | None = None


def cache_dir() -> Path:
    root = os.environ.get("MEMOPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "memoplan")
    return Path(root)


def cuda_dirs() -> tuple[list[str], list[str]]:
    """Include folders (those of the CUDA toolkit, or of pip's nvidia packages) and the
    ``libcudart`` to link, or ``([], [])`` where no ``cuda_runtime_api.h`` is found."""
    from torch.utils import cpp_extension

    homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    site = Path(torch.__file__).resolve().parent.parent
    for incs in ([os.path.join(h, "include")] for h in homes if h):
        if os.path.exists(os.path.join(incs[0], "cuda_runtime_api.h")):
            break
    else:  # pip's layout: nvidia/cuda_runtime/include, with crt/ under nvidia/cuda_nvcc/include
        incs = sorted(glob.glob(str(site / "nvidia" / "*" / "include")))
        if not any(os.path.exists(os.path.join(d, "cuda_runtime_api.h")) for d in incs):
            return [], []
    libs = []
    for inc in incs:
        for sub in ("lib64", "lib", os.path.join("lib", "x64")):
            libs += sorted(glob.glob(os.path.join(os.path.dirname(inc), sub, "libcudart.so*")))
    return incs, libs[:1]


def build(*, host_backend: bool = False) -> Path:
    """Compile the allocator (once per source version; cached) and return the library's path.

    ``host_backend`` builds the CPU variant for tests (malloc instead of CUDA, no headers)."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise MemoplanError("memoplan's planned allocator is built from C++ at first use, and no "
                            "C++ compiler (g++, or $CXX) is on PATH. Install one, or run without "
                            "install_allocator() (transients then use PyTorch's allocator).")
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17"]
    libs: list[str] = []
    if host_backend:
        flags.append("-DMEMOPLAN_HOST_BACKEND")
    else:
        incs, cudart = cuda_dirs()
        if not incs:
            raise MemoplanError(
                "memoplan's planned allocator needs the CUDA runtime headers "
                "(cuda_runtime_api.h) to build, and none were found under CUDA_HOME, "
                "/usr/local/cuda or the nvidia pip packages. Install the CUDA toolkit headers "
                "or set CUDA_HOME, or run without install_allocator().")
        flags += [f"-I{d}" for d in incs]
        if cudart:
            libs += [cudart[0], f"-Wl,-rpath,{os.path.dirname(cudart[0])}"]
        else:
            libs.append("-lcudart")
    text = SOURCE.read_bytes()
    tag = hashlib.sha256(text + " ".join(flags + libs).encode()).hexdigest()[:16]
    out = cache_dir() / f"plan_allocator_{'host' if host_backend else 'cuda'}_{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    r = subprocess.run([compiler, *flags, "-o", str(tmp), str(SOURCE), *libs],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise MemoplanError(f"Building memoplan's planned allocator failed ({compiler}):\n"
                            f"{r.stderr.strip()[-1500:]}\nRun without install_allocator(), or "
                            f"fix the compiler set-up.")
    tmp.replace(out)
    return out


class PlanAllocator:
    """The allocator library, loaded (ctypes) so the runtime can drive its phases."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = self.lib = ctypes.CDLL(str(path))
        i64, p = ctypes.c_int64, ctypes.c_void_p
        lib.mp_malloc.restype = p
        lib.mp_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, p]
        lib.mp_free.argtypes = [p, ctypes.c_ssize_t, ctypes.c_int, p]
        lib.mp_set_arena.argtypes = [p, i64]
        lib.mp_set_arena.restype = ctypes.c_int
        lib.mp_begin.argtypes = [p, i64, i64, ctypes.POINTER(i64), ctypes.POINTER(i64)]
        lib.mp_end.restype = i64
        lib.mp_region.argtypes = [i64, i64]
        lib.mp_reserve.argtypes = [i64, i64]
        lib.mp_reserve.restype = ctypes.c_int
        lib.mp_unreserve.argtypes = [i64]
        lib.mp_stats.argtypes = [ctypes.POINTER(i64)]
        lib.mp_live_ranges.argtypes = [ctypes.POINTER(i64), i64]
        lib.mp_live_ranges.restype = i64
        lib.mp_pool_reserved_high.argtypes = [ctypes.c_int]
        lib.mp_pool_reserved_high.restype = i64
        self.missed = 0  # planned requests that phases never saw
        self.arenas: list = []  # arena buffers handed to the allocator: kept for the process

    def set_arena(self, ptr: int, nbytes: int, keep: object = None) -> bool:
        """Use ``nbytes`` at ``ptr`` as the arena; False (refused) while another arena still
        holds planned tensors. ``keep`` (the buffer) is held for the life of the process: a
        planned tensor may outlive the model whose arena it is in."""
        if not self.lib.mp_set_arena(ptr, nbytes):
            return False
        if keep is not None:
            self.arenas.append(keep)
        return True

    def begin(self, stream: int, slots: list[tuple[int, int]], align: int = 512,
              block: tuple[int, int] | None = None) -> None:
        """Start a phase on ``stream`` (a cudaStream_t as int): planned (size, offset) pairs in
        request order (sizes rounded up to ``align``; offset -1: left to the pool), and
        ``block`` (offset, size): where requests the slots do not place go first-fit."""
        n = len(slots)
        sizes = (ctypes.c_int64 * n)(*(s for s, _ in slots))
        offsets = (ctypes.c_int64 * n)(*(o for _, o in slots))
        self.lib.mp_begin(stream, align, n, sizes, offsets)
        if block is not None:
            self.lib.mp_region(*block)

    def end(self) -> None:
        self.missed += self.lib.mp_end()

    def reserve(self, offset: int, nbytes: int) -> bool:
        return bool(self.lib.mp_reserve(offset, nbytes))

    def unreserve(self, offset: int) -> None:
        self.lib.mp_unreserve(offset)

    def stats(self) -> dict[str, int]:
        out = (ctypes.c_int64 * len(STATS))()
        self.lib.mp_stats(out)
        return {**dict(zip(STATS, out)), "missed": self.missed}

    def reset_peaks(self) -> None:
        self.lib.mp_reset_peaks()

    def reserved_high(self, device: int = 0) -> int:
        """The CUDA pool's reserved-bytes high-water mark (-1 where unknown)."""
        return int(self.lib.mp_pool_reserved_high(device))

    def live_ranges(self) -> list[tuple[int, int]]:
        cap = 4096
        out = (ctypes.c_int64 * (2 * cap))()
        n = self.lib.mp_live_ranges(out, cap)
        return [(out[2 * i], out[2 * i + 1]) for i in range(min(n, cap))]


def phase_slots(plan, phase: str, index: int,
                input_grads: frozenset[str] = frozenset()) -> list[tuple[int, int]]:
    """The (size, arena offset) of every malloc of layer ``index``'s ``phase`` ("forward" or
    "backward"), in request order, from the plan; -1 where the plan places nothing (the pool
    serves it).

    Forward: transients at their level-1 offset inside the layer's ``fwd[i]`` block, the saved
    tensors one after the other in ``round[i]``, the output in the next layer's ``hidden``
    block. Backward: transients inside ``bwd[i]``; the gradient of the layer's input (a
    backward output named in ``input_grads``) in ``grad[i]``, where it lives until the layer
    below has used it; parameter gradients in the pool (they become ``.grad`` and outlive the
    iteration: model states, outside the arena).
    """
    if phase == "recompute":  # no trace lists its requests: see phase_block
        return []
    it, level = plan.levels["iteration"], plan.levels[phase]
    block = lambda name: (it.offsets.get(name), it.sizes.get(name, 0))  # noqa: E731
    base, _ = block(f"{'fwd' if phase == 'forward' else 'bwd'}[{index}]")
    skeletal = set(plan.layer.get("skeletal", ()))
    outputs = set(plan.layer.get("outputs", ()))
    grads = {int(tid): name for tid, name in plan.layer.get("grads", ())}
    rounding, hidden, grad = block(f"round[{index}]"), block(f"hidden[{index + 1}]"), \
        block(f"grad[{index}]")
    used = out_used = 0
    seen: dict[int, int] = {}
    slots = []
    for op, tid, size in plan.layer.get("requests", {}).get(phase, ()):
        if op != "malloc":
            continue
        n = seen[tid] = seen.get(tid, -1) + 1
        key = str(tid) if n == 0 else f"{tid}#{n}"  # ids reused after a free (see dsa)
        offset = -1
        if tid in grads:
            if grads[tid] in input_grads and grad[0] is not None and size <= grad[1]:
                offset, grad = grad[0], (None, 0)
        elif phase == "forward" and tid in outputs:  # level 1 has it too, till the phase ends
            if hidden[0] is not None and out_used + size <= hidden[1]:
                offset, out_used = hidden[0] + out_used, out_used + size
        elif phase == "forward" and tid in skeletal:
            if rounding[0] is not None and used + size <= rounding[1]:
                offset, used = rounding[0] + used, used + size
        elif key in level.offsets and base is not None:
            offset = base + level.offsets[key]
        slots.append((size, offset))
    return slots


def phase_block(plan, phase: str, index: int) -> tuple[int, int] | None:
    """(offset, size) of the block where layer ``index``'s ``phase`` places, first-fit, the
    requests its slots do not: the ``recompute[i]`` workspace while the layer's dropped tokens
    (or, for a checkpointed layer, its whole forward) are recomputed; None for other phases."""
    it = plan.levels["iteration"]
    name = f"recompute[{index}]"
    if phase != "recompute" or name not in it.offsets or not it.sizes.get(name):
        return None
    return it.offsets[name], it.sizes[name]


def install_allocator() -> PlanAllocator:
    """Route every CUDA allocation of this process through memoplan's planned allocator.

    Call it first thing in the training script, before any CUDA tensor exists. Idempotent."""
    global _installed
    if _installed is not None:
        return _installed
    if not torch.cuda.is_available():
        raise MemoplanError("install_allocator() places CUDA tensors, and no CUDA device is "
                            "available here. Leave it out on a CPU (the runtime runs without).")
    path = build()
    alloc = torch.cuda.memory.CUDAPluggableAllocator(str(path), "mp_malloc", "mp_free")
    try:
        torch.cuda.memory.change_current_allocator(alloc)
    except RuntimeError as e:
        raise MemoplanError(
            "install_allocator() came after the first CUDA allocation of this process, and "
            "PyTorch's allocator cannot be swapped then. Call it at the top of the training "
            f"script, before any model or tensor is moved to the GPU ({e}).") from e
    _installed = PlanAllocator(path)
    return _installed


def installed() -> PlanAllocator | None:
    """The planned allocator if ``install_allocator()`` ran in this process."""
    return _installed
