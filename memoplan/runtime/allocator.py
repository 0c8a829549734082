"""Planned addresses for a layer's transient tensors: a process-wide plan-replaying allocator.

PyTorch lets one allocator serve every CUDA tensor of a process
(``torch.cuda.memory.change_current_allocator``), and only if it is installed before the first
CUDA allocation (see ``shared/reference/allocator-facts.md``). Training scripts therefore start
with::

    import memoplan.runtime
    memoplan.runtime.install_allocator()   # first, before torch.cuda.set_device or any CUDA call

The allocator (``csrc/plan_allocator.cpp``, built with ``torch.utils.cpp_extension`` at first
use and cached) serves everything from CUDA's stream-ordered pool, except during a planned
phase: while the runtime replays layer i's forward or backward graph on one device's compute
stream, the phase's requests from that (device, stream) get the plan's addresses in the arena
(level-1 offsets inside the layer's ``fwd[i]``/``bwd[i]`` block; the forward's saved tensors
inside its ``round[i]`` block), and while it recomputes layer i's dropped tokens, first-fit
inside its ``recompute[i]`` block (no trace lists those requests). A request that does not match
the plan (other size, slot still in use, unplanned workspace, a full block) goes to the pool and
is counted: ``stats()`` reports divergence instead of hiding it. No address range is handed out
twice while live, whatever the request stream does.

It fails safe where PyTorch's pluggable-allocator API (``CUDAPluggableAllocator``, torch 2.5 to
2.13) leaves it to the allocator:

- one device: the arena is one device's. A second device's arena is refused with a warning (that
  model runs without planned transients); phases match requests on (device, stream).
- ``Tensor.record_stream`` (NCCL without ``TORCH_NCCL_AVOID_RECORD_STREAMS=1``, side streams,
  FSDP1) is honoured through the API's record-stream hook: a freed block stays allocated until
  an event recorded on each stream that used it has passed.
- out of memory: PyTorch does not check a pluggable allocator's null pointer (an empty storage
  would fail far from its cause), so the entry point it calls raises ``torch.OutOfMemoryError``
  itself, with the planned and unplanned bytes in use and the arena's largest free range;
  ``PlanAllocator.last_error()`` keeps the message.
- ``torch.cuda.memory_allocated``/``memory_stats``/``max_memory_allocated``/
  ``reset_peak_memory_stats``/``_record_memory_history`` fail under a pluggable allocator:
  :func:`memory_stats` and :func:`reset_peak_memory_stats` stand in for them.
- ``torch.cuda.empty_cache()`` reaches the pool through the API's empty-cache hook (idle memory
  goes back to CUDA).
- CUDA graph capture is refused: a request from a capturing stream raises with a message.
- a CUDA call that fails is cleared (not left to be reported for a later kernel) and counted
  (``stats()["cuda_errors"]``); a thread without a CUDA context (NCCL's watchdog freeing a
  tensor) frees on the block's device and is never switched to GPU 0 (no stray context there).

Without the allocator the runtime still runs (its own buffers may still use the arena), with
transients from PyTorch's caching allocator.

Status: the replay logic and the fail-safe paths are tested on a CPU (``-DMEMOPLAN_HOST_BACKEND``
build, driven through ctypes, with stand-ins for events, capture and an exhausted device); the
CUDA build compiles and loads without a GPU, and has not run on a GPU yet.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from memoplan.errors import MemoplanError

SOURCE = Path(__file__).with_name("csrc") / "plan_allocator.cpp"
STATS = ("planned", "shifted", "unplanned", "outside", "pool_bytes", "pool_peak",
         "arena_live", "arena_peak", "arena_allocations", "in_block", "refused", "waiting",
         "cuda_errors", "unplanned_bytes")
MEMORY = ("allocated", "allocated_peak", "reserved", "reserved_peak")

_installed: PlanAllocator | None = None
TOO_LATE = ("install_allocator() came after CUDA was initialised in this process, and PyTorch's "
            "allocator cannot be swapped then. Call it first in the training script, before "
            "torch.cuda.set_device(local_rank), torch.distributed.init_process_group and any "
            "other CUDA call or tensor.")


def cache_dir() -> Path:
    root = os.environ.get("MEMOPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "memoplan")
    return Path(root)


def cudart_major(path: str) -> str | None:
    """The major version of a ``libcudart.so*`` (its name, or that of the file it links to)."""
    for name in (os.path.basename(path), os.path.basename(os.path.realpath(path))):
        m = re.match(r"libcudart\.so\.(\d+)", name)
        if m:
            return m.group(1)
    return None


def cuda_dirs(site: Path | None = None,
              homes: list[str | None] | None = None) -> tuple[list[str], list[str]]:
    """Include folders and the ``libcudart`` to link (pip's nvidia packages under ``site``, the
    CUDA toolkits in ``homes``; by default torch's site-packages, and CUDA_HOME and
    /usr/local/cuda), or ``([], [])`` where no ``cuda_runtime_api.h`` is found.

    With a CUDA build of torch, the library must link the CUDA runtime torch loads: a second one
    of another major version (a CUDA 13 toolkit beside a cu12x wheel) would be loaded next to
    torch's, and on a driver older than it every allocation would fail. So the ``libcudart``
    whose major version is ``torch.version.cuda``'s is taken, pip's first (what the wheel
    loads), then a toolkit's, with the headers beside it; where only others exist, a
    MemoplanError names both versions. A CPU-only torch (no CUDA version) takes the first
    toolkit's, else pip's: that build only compiles and loads."""
    from torch.utils import cpp_extension

    if homes is None:
        homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if site is None:
        site = Path(torch.__file__).resolve().parent.parent

    def with_header(incs: list[str]) -> list[str]:
        return incs if any(os.path.exists(os.path.join(d, "cuda_runtime_api.h"))
                           for d in incs) else []

    roots = []  # (include folders, libcudart files) of each toolkit, then of pip's packages
    for h in dict.fromkeys(h for h in homes if h):
        libs = []
        for sub in ("lib64", "lib", os.path.join("lib", "x64")):
            libs += sorted(glob.glob(os.path.join(h, sub, "libcudart.so*")))
        roots.append((with_header([os.path.join(h, "include")]), libs))
    # pip's layout: nvidia/cuda_runtime (cu12) or nvidia/cu13, crt/ under nvidia/cuda_nvcc
    roots.append((with_header(sorted(glob.glob(str(site / "nvidia" / "*" / "include")))),
                  sorted(glob.glob(str(site / "nvidia" / "cu*" / "lib" / "libcudart.so*")))))
    if not any(incs for incs, _ in roots):
        return [], []
    want = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    if want is None:  # a CPU-only torch: the first root with headers, as it links
        incs, libs = next(root for root in roots if root[0])
        return incs, libs[:1]
    roots = roots[-1:] + roots[:-1]  # pip's first: the runtime the wheel loads
    every_inc = [d for incs, _ in roots for d in incs]
    for incs, libs in roots:
        for lib in libs:
            if cudart_major(lib) == want:  # its own headers first, others for what they lack
                return list(dict.fromkeys(incs + every_inc)), [lib]
    others = [lib for _, libs in roots for lib in libs]
    if others:
        versions = sorted({cudart_major(lib) or "of unknown version" for lib in others})
        raise MemoplanError(
            f"torch {torch.__version__} runs CUDA {torch.version.cuda}, and the only CUDA "
            f"runtime found to build memoplan's planned allocator with is CUDA "
            f"{', '.join(versions)} ({', '.join(others)}): loading it beside torch's would put "
            f"two CUDA runtimes in the process (and fail every allocation on an older driver). "
            f"Install the CUDA {want} runtime (NVIDIA's pip package for CUDA {want}, or a "
            f"CUDA {want} toolkit with CUDA_HOME set to it), or run without "
            f"install_allocator().")
    return every_inc, []  # no libcudart file: the linker's -lcudart, as before


def build(*, host_backend: bool = False) -> Path:
    """Compile the allocator with ``torch.utils.cpp_extension`` (its compiler flags, torch's
    headers and its build cache, under :func:`cache_dir`) and return the library's path.

    ``host_backend`` builds the CPU variant for tests (malloc instead of CUDA, no CUDA headers).
    The CUDA variant takes its CUDA headers and ``libcudart`` from :func:`cuda_dirs` rather than
    from cpp_extension's ``CUDA_HOME``, which a CPU-only torch leaves unset: it then still
    compiles (and loads) wherever CUDA's headers are installed."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise MemoplanError("memoplan's planned allocator is built from C++ at first use, and no "
                            "C++ compiler (c++, or $CXX) is on PATH. Install one, or run without "
                            "install_allocator() (transients then use PyTorch's allocator).")
    cflags, includes, ldflags = ["-O2"], [], []
    if host_backend:
        cflags.append("-DMEMOPLAN_HOST_BACKEND")
    else:
        includes, cudart = cuda_dirs()
        if not includes:
            raise MemoplanError(
                "memoplan's planned allocator needs the CUDA runtime headers "
                "(cuda_runtime_api.h) to build, and none were found under CUDA_HOME, "
                "/usr/local/cuda or the nvidia pip packages. Install the CUDA toolkit headers "
                "or set CUDA_HOME, or run without install_allocator().")
        if cudart:
            ldflags += [cudart[0], f"-Wl,-rpath,{os.path.dirname(cudart[0])}"]
        else:
            ldflags.append("-lcudart")
    name = f"memoplan_plan_allocator_{'host' if host_backend else 'cuda'}"
    folder = cache_dir() / f"{name}_torch{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(folder / "lock")
    try:
        path = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=cflags,
                                  extra_include_paths=includes, extra_ldflags=ldflags,
                                  build_directory=str(folder), with_cuda=False,
                                  is_python_module=False)
    except (RuntimeError, OSError) as e:
        raise MemoplanError(f"Building memoplan's planned allocator failed ({compiler}):\n"
                            f"{str(e).strip()[-1500:]}\nRun without install_allocator(), or "
                            f"fix the compiler set-up.") from e
    return Path(path)


STALE_LOCK_S = 600  # a build takes under a minute: a lock older than this was left behind


def _clear_stale_lock(lock: Path) -> None:
    """torch's extension builder waits, without end and without a word, while its build
    folder's ``lock`` file exists; a build that was killed (Ctrl-C, a job's time limit) leaves
    it behind. Remove one older than `STALE_LOCK_S`, saying so."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        warnings.warn(f"memoplan: removing {lock}, left {age / 60:.0f} min ago by a build of the "
                      f"planned allocator that did not finish", stacklevel=3)
        lock.unlink(missing_ok=True)


class PlanAllocator:
    """The allocator library, loaded (ctypes) so the runtime can drive its phases."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = self.lib = ctypes.CDLL(str(path))
        i64, p = ctypes.c_int64, ctypes.c_void_p
        lib.mp_malloc.restype = p
        lib.mp_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, p]
        lib.mp_free.argtypes = [p, ctypes.c_ssize_t, ctypes.c_int, p]
        lib.mp_record_stream.argtypes = [p, p]
        lib.mp_last_error.argtypes = [ctypes.c_char_p, i64]
        lib.mp_last_error.restype = i64
        lib.mp_set_arena.argtypes = [p, i64, ctypes.c_int]
        lib.mp_set_arena.restype = ctypes.c_int
        lib.mp_begin.argtypes = [ctypes.c_int, p, i64, i64, ctypes.POINTER(i64),
                                 ctypes.POINTER(i64)]
        lib.mp_begin.restype = ctypes.c_int
        lib.mp_end.restype = i64
        lib.mp_region.argtypes = [i64, i64]
        lib.mp_arena_idle.restype = ctypes.c_int
        lib.mp_detour.argtypes = [i64, i64]
        lib.mp_detour.restype = None
        lib.mp_detour_end.restype = None
        lib.mp_reserve.argtypes = [i64, i64]
        lib.mp_reserve.restype = ctypes.c_int
        lib.mp_unreserve.argtypes = [i64]
        lib.mp_stats.argtypes = [ctypes.POINTER(i64)]
        lib.mp_memory_stats.argtypes = [ctypes.c_int, ctypes.POINTER(i64)]
        lib.mp_live_ranges.argtypes = [ctypes.POINTER(i64), i64]
        lib.mp_live_ranges.restype = i64
        lib.mp_pool_reserved_high.argtypes = [ctypes.c_int]
        lib.mp_pool_reserved_high.restype = i64
        self.device: int | None = None  # the arena's device: the only one the plan places on
        self.missed = 0  # planned requests that phases never saw
        self.arenas: list = []  # the arena buffer in use, kept until another replaces it

    def address(self, name: str) -> int:
        """The address of the library's function ``name`` (for PyTorch's hooks)."""
        return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value

    def set_arena(self, ptr: int, nbytes: int, keep: object = None,
                  device: int | None = None) -> bool:
        """Use ``nbytes`` at ``ptr`` on ``device`` (default: that of ``keep``, a tensor; else 0)
        as the arena; False (refused) while another arena still holds planned tensors, or (with
        a warning) for a device other than the first arena's. ``keep`` (the buffer) is held
        until another arena replaces it, even past its model: a planned tensor may outlive the
        model whose arena it is in. A replaced one is let go: the switch is accepted only when
        none of its planned tensors is alive (and each apply() would otherwise keep a whole
        arena of GPU memory for the life of the process)."""
        if device is None:
            on_cuda = isinstance(keep, torch.Tensor) and keep.device.type == "cuda"
            device = keep.device.index if on_cuda else 0
        done = self.lib.mp_set_arena(ptr, nbytes, device)
        if done < 0:
            warnings.warn(
                f"memoplan's planned allocator places one device's plan per process (cuda:"
                f"{self.device}), so the plan on cuda:{device} runs without it: that model's "
                f"transients come from the pool. Run one process per GPU (torchrun) to place "
                f"every device's transients.", stacklevel=2)
            return False
        if not done:
            return False
        self.device = device
        if keep is not None:
            self.arenas = [keep]
        return True

    def let_go_idle_arena(self) -> None:
        """Drop this allocator's hold on the arena in use when none of its planned tensors (and
        none of the runtime's reserved ranges) is alive: called before a new arena is
        allocated, so that a second apply() (a rebuilt model, a retry) does not need both at
        once. A model still alive keeps its own arena buffer."""
        if self.arenas and self.lib.mp_arena_idle():
            self.arenas.clear()

    def begin(self, stream: int, slots: list[tuple[int, int]], align: int = 512,
              block: tuple[int, int] | None = None, device: int = 0) -> bool:
        """Start a phase on (``device``, ``stream``: a cudaStream_t as int): planned (size,
        offset) pairs in request order (sizes rounded up to ``align``; offset -1: left to the
        pool), and ``block`` (offset, size): where requests the slots do not place go
        first-fit. False (no phase: everything goes to the pool) where the arena is another
        device's."""
        n = len(slots)
        sizes = (ctypes.c_int64 * n)(*(s for s, _ in slots))
        offsets = (ctypes.c_int64 * n)(*(o for _, o in slots))
        if not self.lib.mp_begin(device, stream, align, n, sizes, offsets):
            return False
        if block is not None:
            self.lib.mp_region(*block)
        return True

    def end(self) -> None:
        self.missed += self.lib.mp_end()

    def detour(self, offset: int, nbytes: int) -> None:
        """Inside the active phase, until ``detour_end``: the script waits and requests go
        first-fit into arena bytes [offset, offset + nbytes) (0 bytes: the phase's own block);
        ring attention's calls, whose requests no trace lists (``runtime.ring``)."""
        self.lib.mp_detour(offset, nbytes)

    def detour_end(self) -> None:
        self.lib.mp_detour_end()

    def reserve(self, offset: int, nbytes: int) -> bool:
        return bool(self.lib.mp_reserve(offset, nbytes))

    def unreserve(self, offset: int) -> None:
        self.lib.mp_unreserve(offset)

    def stats(self) -> dict[str, int]:
        """Request counters: ``planned``, ``shifted``, ``unplanned``, ``outside``, ``in_block``,
        ``refused`` (null: out of memory, graph capture), ``missed``; bytes (``pool_bytes``,
        ``arena_live`` and their peaks); ``arena_allocations`` live; ``waiting``: freed blocks
        held until the streams that used them (record_stream) pass their events;
        ``cuda_errors``: CUDA calls of the allocator's own that failed (an event query while
        another thread captures a graph, a free on a destroyed stream, calls after a kernel
        fault), each error cleared so it is not reported later for an unrelated kernel; a pool
        block whose free failed is leaked, never freed on another stream (the memory stays in
        CUDA's pool, out of ``pool_bytes``)."""
        out = (ctypes.c_int64 * len(STATS))()
        self.lib.mp_stats(out)
        return {**dict(zip(STATS, out)), "missed": self.missed}

    def memory_stats(self, device: int | None = None) -> dict[str, dict[str, int]]:
        """Bytes ``allocated``, ``reserved`` and their peaks for ``arena`` (planned tensors live;
        its size), ``pool`` (its allocations, the arena buffer among them; what CUDA's pool on
        ``device`` holds, by default the arena's device) and ``total`` (live tensors, planned
        or not, the arena buffer not counted; the pool's reserve). Counts cover every device."""
        out = (ctypes.c_int64 * (3 * len(MEMORY)))()
        if device is None:
            device = self.device or 0
        self.lib.mp_memory_stats(device, out)
        return {part: dict(zip(MEMORY, out[len(MEMORY) * i: len(MEMORY) * (i + 1)]))
                for i, part in enumerate(("arena", "pool", "total"))}

    def reset_peaks(self) -> None:
        """Peaks restart from what is allocated and reserved now."""
        self.lib.mp_reset_peaks()

    def empty_cache(self) -> None:
        """What ``torch.cuda.empty_cache()`` calls: idle pool memory goes back to CUDA."""
        self.lib.mp_empty_cache()

    def last_error(self) -> str:
        """Why the last request that got no memory was refused ('' if none was)."""
        n = self.lib.mp_last_error(None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        self.lib.mp_last_error(buf, n + 1)
        return buf.value.decode(errors="replace")

    def reserved_high(self, device: int = 0) -> int:
        """The CUDA pool's reserved-bytes high-water mark (-1 where unknown)."""
        return int(self.lib.mp_pool_reserved_high(device))

    def live_ranges(self) -> list[tuple[int, int]]:
        cap = 4096
        out = (ctypes.c_int64 * (2 * cap))()
        n = self.lib.mp_live_ranges(out, cap)
        return [(out[2 * i], out[2 * i + 1]) for i in range(min(n, cap))]


def install_allocator() -> PlanAllocator:
    """Route every CUDA allocation of this process through memoplan's planned allocator.

    Call it first thing in the training script, before ``torch.cuda.set_device``,
    ``init_process_group`` or any other CUDA call (each initialises PyTorch's own allocator,
    which cannot be swapped then). Idempotent.
    PyTorch's record-stream and empty-cache hooks are set to the allocator's; a PyTorch whose
    pluggable allocator has no such hooks is refused (``Tensor.record_stream`` would be ignored,
    and memory NCCL or a side stream still uses could be handed out again)."""
    global _installed
    if _installed is not None:
        return _installed
    if not torch.cuda.is_available():
        raise MemoplanError("install_allocator() places CUDA tensors, and no CUDA device is "
                            "available here. Leave it out on a CPU (the runtime runs without).")
    # torch.cuda.set_device (torchrun's usual first line), init_process_group or any CUDA
    # call starts PyTorch's own allocator, which cannot be swapped afterwards
    if torch.cuda.is_initialized():
        raise MemoplanError(TOO_LATE)
    path = build()
    planner = PlanAllocator(path)
    alloc = torch.cuda.memory.CUDAPluggableAllocator(str(path), "mp_torch_malloc", "mp_free")
    hooks = alloc.allocator()
    missing = [h for h in ("set_record_stream_fn", "set_reset_fn") if not hasattr(hooks, h)]
    if missing:
        raise MemoplanError(
            f"This PyTorch ({torch.__version__}) has no {' or '.join(missing)} on its pluggable "
            f"allocator, so memoplan's planned allocator could not honour Tensor.record_stream: "
            f"memory used by NCCL (unless TORCH_NCCL_AVOID_RECORD_STREAMS=1), side streams or "
            f"FSDP1 could be reused while still in use. Use PyTorch 2.5 or later, or run "
            f"without install_allocator().")
    hooks.set_record_stream_fn(planner.address("mp_record_stream"))
    hooks.set_reset_fn(planner.address("mp_empty_cache"))
    try:
        torch.cuda.memory.change_current_allocator(alloc)
    except RuntimeError as e:
        raise MemoplanError(f"{TOO_LATE} ({e})") from e
    _installed = planner
    return _installed


def installed() -> PlanAllocator | None:
    """The planned allocator if ``install_allocator()`` ran in this process."""
    return _installed


def _require() -> PlanAllocator:
    if _installed is None:
        raise MemoplanError("memoplan's memory statistics are those of its planned allocator, "
                            "and install_allocator() has not run in this process: use "
                            "torch.cuda.memory_stats() and its kin instead.")
    return _installed


def memory_stats(device: int | None = None) -> dict[str, dict[str, int]]:
    """What ``torch.cuda.memory_stats`` would say under the planned allocator (where it fails):
    bytes ``allocated``, ``reserved`` and their peaks (``allocated_peak``, ``reserved_peak``)
    for the ``arena``, the ``pool`` and in ``total`` (see :meth:`PlanAllocator.memory_stats`).
    ``total["allocated"]`` stands in for ``torch.cuda.memory_allocated()``,
    ``total["allocated_peak"]`` for ``max_memory_allocated()``, ``total["reserved"]`` for
    ``memory_reserved()``."""
    return _require().memory_stats(device)


def reset_peak_memory_stats() -> None:
    """Restart every peak of :func:`memory_stats` from now (as
    ``torch.cuda.reset_peak_memory_stats`` would)."""
    _require().reset_peaks()
