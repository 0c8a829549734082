"""Moving kept tensors between the device and the host.

``Copier`` on a CPU copies within host memory (the "host" is the same memory space), so CI
exercises the same schedule and the same buffer handling. On a CUDA device it copies on two
side streams: device-to-host after each layer's forward (the compute stream goes on with the
next layer) and host-to-device in backward, where a layer's data is prefetched into its arena
block while the next layer (in backward order) computes.

Host memory is one slab, sized by the plan before the first copy and pinned once: the host
copies of one iteration at the length the run sees (every offloaded layer's whole tensors and
the alpha share of its split ones, from the plan's modes and swap fractions). On a GPU it is
page-locked with ``cudaHostRegister`` at exactly that size: ``pin_memory=True`` goes through
PyTorch's caching host allocator, which rounds every block up to a power of two (a 70 GiB
request pins 128 GiB), and pinning is slow (1.9 s for 4 GiB on an H200 host). Buffers are carved
from the slab per (layer, tensor) and reused every step once their backward has brought them
back. A buffer the slab cannot hold (a second forward of a layer before its backward, a longer
sequence than the first step's) is a slab of its own, counted (``extra_bytes``), kept for
reuse like the others and freed (after a device sync) once a longer request outgrows it; slab
space left by buffers outgrown this way is not reused.

Every transfer is made of plain memory copies: the host buffer holds the tensor's elements
densely in the device tensor's own memory order (a host side that is not dense would make
PyTorch stage through pageable memory on the CPU, synchronously). A device side that is not
dense in that order (the first k tokens of a tensor whose token axis is not outermost: heads
before tokens, or batch > 1) is copied in dense pieces, one per index of the dims outside the
token axis, or, beyond ``MAX_PIECES`` pieces, through a dense staging tensor on the device.

Stream safety does not use ``record_stream`` (a process-wide pluggable allocator, see
``allocator.py``, ignores it, and the caching allocator would keep the memory until the copies
queued after it end too): the device tensors a layer copies out are held, with an event
recorded after their copies, until the compute stream has waited for that event (before layer
i+2's forward, the paper's rounding-buffer rule, or before any backward); a prefetch into the
arena first waits for the compute work queued before it, the previous users of those addresses.

The CUDA path has not run on a GPU yet (no device in the sessions that wrote it): treat it as
untested until the GPU checks in benchmarks/ have been run.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from memoplan.errors import MemoplanError
from memoplan.units import fmt_bytes

ALIGN = 512       # bytes; host buffers start at multiples of this inside the slab
MAX_PIECES = 256  # a copy in more dense pieces than this goes through a staging tensor


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _leading_dims_to_split(t: torch.Tensor) -> int | None:
    """The fewest leading dims of ``t`` to loop over so that each piece is dense, or None if
    that makes more than ``MAX_PIECES`` pieces."""
    if t.numel() == 0:
        return 0
    pieces = 1
    for j in range(t.dim() + 1):
        if t[(0,) * j].is_contiguous():  # every piece has the strides of the first one
            return j
        pieces *= t.shape[j]
        if pieces > MAX_PIECES:
            return None
    return None


class _Slab:
    """A block of host memory, handed out in consecutive pieces. For a CUDA ``device`` it is
    page-locked at its exact size (rounded to whole pages, which it owns alone) with
    ``cudaHostRegister``, and unregistered when the slab goes, after the device's work."""

    def __init__(self, nbytes: int, device: torch.device | None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        self.used = 0
        if self.device is None or not nbytes:
            self.device = None
            self.base = torch.empty(nbytes, dtype=torch.uint8)
            return
        size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        if nbytes >= 1 << 32:  # about 0.5 s per GiB: say why the first step waits
            print(f"memoplan: {_rank_prefix()}pinning {fmt_bytes(nbytes)} of host memory for the "
                  f"plan's host copies (once, about 0.5 s per GiB{_WAIT_NOTE})",
                  file=sys.stderr, flush=True)
        self._memory = torch.empty(size + mmap.PAGESIZE, dtype=torch.uint8)
        start = -self._memory.data_ptr() % mmap.PAGESIZE
        self.base = self._memory[start: start + nbytes]
        with torch.cuda.device(self.device):
            rc = int(torch.cuda.cudart().cudaHostRegister(self.base.data_ptr(), size, 1))
        if rc != 0:
            device, self.device = self.device, None
            _clear_cuda_error()
            raise MemoplanError(
                f"{_rank_prefix()}Pinning {fmt_bytes(nbytes)} of host memory for this plan's host "
                f"copies on {device} failed (cudaHostRegister error {rc}). The host may lack "
                f"that much free memory (every rank of a node pins its own), or the locked-memory "
                f"limit is too low ('ulimit -l'). Solve again with a smaller --host-mem-gb, or "
                f"raise the limit.")

    def carve(self, nbytes: int) -> torch.Tensor | None:
        """``nbytes`` of the slab not handed out before, or None when it is full."""
        if self.used + nbytes > self.base.numel():
            return None
        raw = self.base[self.used: self.used + nbytes]
        self.used += aligned(nbytes)
        return raw

    def __del__(self) -> None:
        if getattr(self, "device", None) is not None:  # None: unpinned, or never made
            with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone already
                torch.cuda.synchronize(self.device)  # no copy may still use the range
                torch.cuda.cudart().cudaHostUnregister(self.base.data_ptr())


class CudaStreams:
    """The stream and event calls the copier makes. Tests stand in a model that runs copy-stream
    work as late as the waits allow, on a CPU."""

    def stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    def current(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def event(self) -> Any:
        return torch.cuda.Event()

    def launch(self, stream: Any, work: Callable[[], None]) -> None:
        """Queue ``work`` (copies) on ``stream``."""
        with torch.cuda.stream(stream):
            work()


class Copier:
    """Device <-> host copies for one model; one instance serves all its layers.

    ``alphas``: the swap fraction of each offloaded layer of the plan (sizes the slab).
    ``streams``: copy asynchronously through these (default: CUDA's, for CUDA tensors; CPU
    tensors are copied at once)."""

    def __init__(self, alphas: list[float], streams: CudaStreams | None = None) -> None:
        self.alphas = alphas
        self._cuda = streams or CudaStreams()
        self._always_async = streams is not None
        self._slab: _Slab | None = None
        # free host buffers (raw bytes) by layer/tensor key; one held by a layer call that has
        # not run its backward yet is never written again
        self._free: dict[str, list[torch.Tensor]] = {}
        self._d2h: Any = None  # copy streams, made at the first copy
        self._h2d: Any = None
        self.slab_bytes = 0            # host memory reserved up front (pinned on a GPU)
        self.pin_seconds = 0.0         # what making (and pinning) it took
        self.host_buffer_bytes = 0     # all host buffers made (slab or extra)
        self.extra_bytes = 0           # host buffers the slab could not hold
        self.pieced = 0                # transfers done as one copy per dense piece
        self.staged = 0                # transfers staged through a dense device tensor
        # sources of this forward's copies (GPU), each with its version at the copy; then by
        # layer, with the event recorded after them
        self._copying: list[tuple[torch.Tensor, int]] = []
        self._held: dict[int, tuple[Any, list[tuple[torch.Tensor, int]]]] = {}

    @property
    def sized(self) -> bool:
        return self._slab is not None

    def reserve(self, need: Callable[[float], int], device: torch.device) -> None:
        """Make the slab (once): ``need(alpha)`` is one offloaded layer's host bytes at this
        run's length, every buffer rounded up with :func:`aligned`."""
        if self._slab is None:
            self.reserve_bytes(sum(need(a) for a in self.alphas), device)

    def reserve_bytes(self, total: int, device: torch.device) -> None:
        """Make the slab (once) of ``total`` bytes, pinned for a CUDA ``device``; the seconds
        it took are ``pin_seconds``. Under torch.distributed every rank makes its own and then
        all ranks agree that each did (:func:`agree_on_slabs`): a rank that could not raises,
        and so does every other rank, here, instead of waiting for it in the next collective.
        Every rank must therefore reserve at the same point (``apply``/``prepare``, or the
        first offloaded layer call)."""
        if self._slab is None:
            began = time.perf_counter()
            try:
                slab, failure = _Slab(total, device), None
            except Exception as e:  # noqa: BLE001  (the other ranks must hear of any failure)
                slab, failure = None, e
            seconds = time.perf_counter() - began
            agree_on_slabs(failure, total, device)
            if failure is not None:  # not distributed: this rank's own error
                raise failure
            self._slab = slab
            self.pin_seconds = seconds
            self.slab_bytes = total

    def _async(self, device: torch.device) -> bool:
        return self._always_async or device.type == "cuda"

    def _streams(self, device: torch.device) -> tuple[Any, Any]:
        if self._d2h is None:
            self._d2h = self._cuda.stream(device)
            self._h2d = self._cuda.stream(device)
        return self._d2h, self._h2d

    def _buffer(self, key: str, nbytes: int, device: torch.device) -> torch.Tensor:
        """Raw host bytes for ``key``: a free buffer that is large enough, else a new one."""
        free = self._free.setdefault(key, [])
        for i, raw in enumerate(free):
            if raw.numel() >= nbytes:
                return free.pop(i)
        free.clear()  # too small for this length: let them go (memory outside the slab is freed)
        raw = self._slab.carve(nbytes) if self._slab is not None else None
        if raw is None:  # a slab of its own, freed (and unpinned) with its last reference
            own = _Slab(nbytes, device)
            raw = own.carve(nbytes)
            raw.memoplan_slab = own
            self.extra_bytes += nbytes
        self.host_buffer_bytes += nbytes
        return raw

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
        """``dst.copy_(src)`` as plain memory copies, where the host side is dense and the
        device side may not be (the first k tokens of a tensor whose token axis is not
        outermost): one copy per dense piece when there are at most ``MAX_PIECES``, else
        through a dense device tensor. On a GPU this runs on a copy stream; a staging tensor
        is allocated there and so freed in that stream's order, after its copy."""
        strided = dst if src.is_contiguous() else src
        j = _leading_dims_to_split(strided)
        if j is not None:
            if j:
                self.pieced += 1
            for idx in itertools.product(*map(range, strided.shape[:j])):
                dst[idx].copy_(src[idx], non_blocking=non_blocking)
            return
        self.staged += 1
        if strided is src:
            staged = src.contiguous()
            dst.copy_(staged, non_blocking=non_blocking)
        else:
            staged = torch.empty(src.shape, dtype=src.dtype, device=dst.device)
            staged.copy_(src, non_blocking=non_blocking)
            dst.copy_(staged)

    def to_host(self, key: str, t: torch.Tensor, order: list[int]) -> tuple[tuple, torch.Tensor]:
        """Copy ``t`` into a host buffer that holds its elements in dim order ``order``
        (outermost first); returns (the buffer's slot, the host tensor, shaped like ``t``).
        Hand the slot back with ``give_back`` once the copy has been brought back."""
        raw = self._buffer(key, t.numel() * t.element_size(), t.device)
        dense = raw[: t.numel() * t.element_size()].view(t.dtype).view([t.shape[d] for d in order])
        if not self._async(t.device):
            self._copy(dense, t.permute(order), False)
        else:
            stream, _ = self._streams(t.device)
            stream.wait_stream(self._cuda.current(t.device))  # t is written, the buffer free
            self._cuda.launch(stream, lambda: self._copy(dense, t.permute(order), True))
            # held until the compute stream has waited for the copy (no record_stream: it
            # would keep the memory until the copies queued after it end too)
            self._copying.append((t, t._version))
        return (key, raw), dense.permute([order.index(d) for d in range(t.dim())])

    def give_back(self, slot: tuple, host: torch.Tensor) -> None:
        """The copy in ``host`` was brought back (the compute stream waited for that): its
        buffer is reusable."""
        key, raw = slot
        self._free.setdefault(key, []).append(raw)

    def finish_forward(self, index: int) -> None:
        """Layer ``index``'s copies are queued: hold their sources until they are done."""
        if not self._copying:
            return
        if index in self._held:  # an earlier call of this layer that no backward has seen
            self.release_copied(only=index)
        done = self._cuda.event()
        done.record(self._d2h)
        self._held[index] = (done, self._copying)
        self._copying = []

    def wait_copies(self, index: int) -> None:
        """The compute stream waits until layer ``index``'s copies are done (their sources stay
        held until ``release_copied``).

        A source written in place before this wait, after its copy was queued, may or may not
        have reached the host copy: that is refused here (autograd does not watch these
        tensors: they are not saved for backward; ``apply`` checks the layer inputs, also on a
        CPU). Writes after it (debug poisoning) cannot change the copy."""
        if index in self._held:
            done, sources = self._held[index]
            written = any(v is not None and t._version != v for t, v in sources)
            self._cuda.current(sources[0][0].device).wait_event(done)
            self._held[index] = (done, [(t, None) for t, _ in sources])  # checked: said once
            if written:
                raise modified_in_place(index)

    def release_copied(self, before: int | None = None, only: int | None = None) -> None:
        """Let the compute stream wait for the copies of layers ``< before`` (all if None; only
        layer ``only`` if given) and drop their sources, whose memory it may then reuse."""
        for index in list(self._held):
            if (only is not None and index != only) or (before is not None and index >= before):
                continue
            self.wait_copies(index)
            del self._held[index]

    def prefetch(self, host: torch.Tensor, dest: torch.Tensor,
                 order: list[int]) -> tuple[torch.Tensor, Any]:
        """Start copying a host copy (from ``to_host``, laid out in ``order``) into ``dest``
        (same shape) on the host-to-device stream; returns ``dest`` and an event that ``ready``
        waits for (the compute stream goes on meanwhile)."""
        src, dst = host.permute(order), dest.permute(order)  # src is dense by construction
        if not self._async(dest.device):
            self._copy(dst, src, False)
            return dest, None
        d2h, h2d = self._streams(dest.device)
        h2d.wait_stream(d2h)  # the forward copy into this host buffer has finished
        h2d.wait_stream(self._cuda.current(dest.device))  # dest's earlier users are done
        self._cuda.launch(h2d, lambda: self._copy(dst, src, True))
        done = self._cuda.event()
        done.record(h2d)
        return dest, done

    def ready(self, fetched: tuple[torch.Tensor, Any]) -> torch.Tensor:
        """The prefetched tensor, once the compute stream has waited for its copy."""
        out, done = fetched
        if done is not None:
            self._cuda.current(out.device).wait_event(done)
        return out

    def settle(self, fetched: tuple[torch.Tensor, Any]) -> None:
        """Wait on the host until a prefetch has finished: for giving back its memory from any
        thread (whose current stream need not be the compute stream)."""
        _, done = fetched
        if done is not None:
            done.synchronize()


_WAIT_NOTE = ("; under torch.distributed every rank then waits for the slowest one's, so keep "
              "the process group's timeout, init_process_group(timeout=...), longer than that")


def _clear_cuda_error() -> None:
    """Read (and so reset) this thread's last CUDA runtime error. A failed cudaHostRegister
    leaves it set, and PyTorch checks it after its next kernel launch: that kernel (the ranks'
    agreement below, or the next step) would raise the pinning error as its own. Best effort:
    through the CUDA runtime library this process has loaded."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            libs = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:  # no /proc: nothing to clear here
        return
    for lib in sorted(libs):
        with contextlib.suppress(Exception):  # one that cannot be loaded: the next may
            ctypes.CDLL(lib).cudaGetLastError()


def nccl_device() -> torch.device | None:
    """This rank's GPU when torch.distributed runs over NCCL (alone or beside gloo): the device
    the default group is bound to, else the current one; None otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and torch.cuda.is_available()):
        return None
    if "nccl" not in str(dist.get_backend()).lower():
        return None
    bound = getattr(dist.distributed_c10d._get_default_group(), "bound_device_id", None)
    return bound if bound is not None else torch.device("cuda", torch.cuda.current_device())


def _agreement_device(device: torch.device | None = None) -> torch.device:
    """Where the default process group reduces a tensor: on the CPU for gloo (also a mixed
    'cpu:gloo,cuda:nccl' group), for NCCL on this rank's GPU: ``device`` (the slab's) when it
    is a CUDA device, else the group's bound device, else the current one (a job that binds
    its device without set_device would otherwise reduce on cuda:0 from every rank)."""
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or "nccl" not in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    if device is not None and device.type == "cuda" and device.index is not None:
        return device
    return nccl_device()


def agree_on_slabs(failure: BaseException | None, nbytes: int,
                   device: torch.device | None = None) -> None:
    """Under torch.distributed (more than one rank), every rank calls this once it has tried to
    make (pin) its host slab of ``nbytes``, ``failure`` being its error or None; if any rank
    failed, every rank raises a MemoplanError that names the failing ranks. One MIN all-reduce
    of a per-rank ok flag over the default group: a CPU tensor for gloo, one on the current
    CUDA device for NCCL, made on a side stream so that a planned phase in progress (a model
    whose slab is sized at its first offloaded layer call) neither places it nor waits for
    it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    where = _agreement_device(device)
    ok = [1] * world
    ok[rank] = int(failure is None)
    try:
        side = torch.cuda.stream(torch.cuda.Stream(where)) if where.type == "cuda" \
            else contextlib.nullcontext()
        with side:
            flags = torch.tensor(ok, dtype=torch.int32).to(where)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            failed = [r for r, x in enumerate(flags.tolist()) if not x]
    except Exception as e:  # noqa: BLE001
        raise MemoplanError(
            f"rank {rank}: the ranks' check that each pinned its {fmt_bytes(nbytes)} of host "
            f"memory failed ({type(e).__name__}: {e}). If a rank timed out waiting, another "
            f"was still pinning (about 0.5 s per GiB, the ranks of a node at once) or had "
            f"stopped: make the process group's timeout, init_process_group(timeout=...), "
            f"longer than the slowest rank's pinning, and look for a rank that failed."
            + (f" This rank's own pinning failed too: {failure}" if failure else "")) from e
    if not failed:
        return
    names = ", ".join(map(str, failed))
    plural = "s" if len(failed) > 1 else ""
    mine = (f" This rank's error: {type(failure).__name__}: {failure}" if failure is not None
            else f" See rank {failed[0]}'s error for the cause.")
    raise MemoplanError(
        f"rank {rank}: making the host memory for the plan's host copies "
        f"({fmt_bytes(nbytes)} per rank, page-locked on a GPU) failed on rank{plural} {names} of "
        f"{world}; every rank stops here rather than wait for {'them' if plural else 'it'} in "
        f"the next collective.{mine} Raise the locked-memory limit on that node ('ulimit -l "
        f"unlimited', or memlock in the container, systemd or Slurm settings) or free host "
        f"memory there, or make each rank pin less: solve again with a smaller --host-mem-gb "
        f"or --alpha, or with fewer GPUs per node (--gpus-per-node; each rank of a node pins its "
        f"own). Pinning takes about 0.5 s per GiB and the ranks wait for each other after it: "
        f"keep the process group's timeout (init_process_group(timeout=...)) above that, and "
        f"pin before training's collectives (memoplan.runtime.prepare(model, device=...) right "
        f"after apply).") from failure


def _rank_prefix() -> str:
    """'rank R: ' under torch.distributed (each rank pins its own slab), else ''."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f"rank {dist.get_rank()}: "
    return ""


def modified_in_place(index: int) -> MemoplanError:
    return MemoplanError(
        f"A tensor that layer {index} keeps for its backward (copied to host or kept on the "
        f"device) was modified in place after that layer's forward, for example its input by "
        f"'x += ...' in the model's forward. The backward would read the wrong value. Write it "
        f"out of place ('x = x + ...').")
