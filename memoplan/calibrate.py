"""`memoplan calibrate`: measure, on this machine, the figures memoplan's cost model uses.

One small function per figure; each returns its value and a source text saying how it was
obtained. :func:`calibrate` runs them all and returns the hardware file's dict (the format
`memoplan solve --hw FILE.json` reads). Every timing warms up first, then takes the median of
a few repeats, each long enough (many calls in a row) that the clock's resolution and launch
latency do not count. On a CUDA device it measures the GPU (bf16) and its host link; on a CPU it
measures the CPU (float32: CPU bf16 matmuls run an unrepresentative slow path), with copies
and pinning standing in as described in each source.
"""

from __future__ import annotations

import datetime
import math
import mmap
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memoplan.errors import MemoplanError

GiB = 2**30
MiB = 2**20

Figure = tuple[Any, str]  # (value, source)
Progress = Callable[[str, int, int], None]  # (what runs now, steps done, steps in all)

# Dense (no sparsity) bf16 Tensor Core TFLOP/s from NVIDIA's datasheets, which print the figure
# with sparsity: dense is half of it. First match on the device name wins (NVL/PCIe first).
DATASHEET_BF16_TFLOPS: list[tuple[str, float, str]] = [
    ("GH200", 989.0, "NVIDIA GH200 Grace Hopper Superchip datasheet: BF16 Tensor Core 1,979 "
                     "TFLOPS with sparsity"),
    ("H200 NVL", 835.0, "NVIDIA H200 NVL datasheet: BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    ("H200", 989.0, "NVIDIA H200 SXM datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("H100 NVL", 835.0, "NVIDIA H100 NVL datasheet: BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    ("H100 PCIe", 756.0, "NVIDIA H100 PCIe datasheet: BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    ("H100", 989.0, "NVIDIA H100 SXM datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    ("A800", 312.0, "NVIDIA A800 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
]

FIELDS = ("name", "gpus_per_node", "gpu_mem_gb", "host_mem_gb", "peak_tflops", "matmul_tflops",
          "attn_fwd_tflops", "attn_bwd_tflops", "hbm_gbps", "d2h_gbps", "h2d_gbps",
          "duplex_gbps", "pcie_node_gbps", "pin_s_per_gib")

HOST_MEM_SHARE = 0.9  # of MemAvailable: the rest stays for the training process itself


@dataclass
class Bench:
    """The device being measured and how to time work on it."""

    device: torch.device
    name: str
    quick: bool
    date: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def reps(self) -> int:
        return 3 if self.quick else 5

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, fn: Callable[[], Any]) -> float:
        """Median seconds of one ``fn()``: one warm-up call, then ``reps`` timed batches of as
        many calls as fill about ``min_s`` each."""
        min_s = 0.02 if self.quick else 0.2
        self.sync()
        fn()  # warm-up (kernel choice, allocator, caches)
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        inner = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            self.sync()
            times.append((time.perf_counter() - t0) / inner)
        return statistics.median(times)

    def measured(self, detail: str) -> str:
        return f"measured by memoplan calibrate on {self.name}, {detail}, {self.date}"


def _sig(x: float) -> float:
    """Four significant digits (JSON stays readable; small CPU figures keep their precision)."""
    return float(f"{x:.4g}")


def check_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, present on this machine; otherwise exit 2 with why."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise MemoplanError(f"--device must be cpu, cuda or cuda:N, got '{device}'.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            cuda = torch.version.cuda
            built = "without CUDA" if cuda is None else f"with CUDA {cuda}"
            raise MemoplanError(
                f"calibrate --device {device} needs a CUDA GPU, but torch {torch.__version__} "
                f"(built {built}) sees none. Run it on the machine to describe, with a CUDA "
                f"build of torch, or use --device cpu to measure this CPU.")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise MemoplanError(f"--device {device}: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s).")
        dev = torch.device("cuda", index)
    return dev


def check_output(path: str | Path) -> None:
    """Fail before measuring when ``path`` cannot be written (exit 2)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise MemoplanError(f"Cannot write the hardware file '{path}': {_why(e)}. "
                            f"Pass another -o path.") from None


def _why(e: OSError) -> str:
    if isinstance(e, FileExistsError) and e.filename:  # mkdir where a file is
        return f"'{e.filename}' is a file, not a folder"
    if isinstance(e, NotADirectoryError) and e.filename:
        return f"a file stands in the path to '{e.filename}'"
    return str(e.strerror or e)


def write_hardware(path: str | Path, hw: dict) -> Path:
    """Write ``hw`` as JSON atomically; an unwritable path exits 2."""
    from memoplan.jsonio import write_json_atomic

    try:
        return write_json_atomic(path, hw)
    except OSError as e:
        raise MemoplanError(f"Cannot write the hardware file '{path}': {_why(e)}. "
                            f"Pass another -o path.") from None


# --- figures -------------------------------------------------------------------------------

def device_name(dev: torch.device) -> Figure:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev), "torch.cuda.get_device_name"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return (f"cpu ({model}, {torch.get_num_threads()} threads)",
            "/proc/cpuinfo and torch.get_num_threads")


def gpus_per_node(b: Bench) -> Figure:
    if b.cuda:
        return torch.cuda.device_count(), "torch.cuda.device_count() on this machine"
    return 1, "a CPU counts as one device"


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_mem_gb(b: Bench) -> Figure:
    if b.cuda:
        total = torch.cuda.mem_get_info(b.device)[1]
        return _sig(total / GiB), f"torch.cuda.mem_get_info total of {b.name}, {b.date}"
    return _sig(_total_ram() / GiB), f"total RAM of this machine (a CPU's device memory), {b.date}"


def host_mem_gb(b: Bench) -> Figure:
    """Host memory that may hold pinned copies, per node: a share of what the kernel reports
    available (pinning all of it to find out would take about 0.5 s per GiB)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        avail = int(info["MemAvailable"].split()[0]) * 1024
        how = "MemAvailable in /proc/meminfo"
    except (OSError, KeyError, ValueError):
        avail, how = _total_ram(), "total RAM (no /proc/meminfo)"
    return (_sig(HOST_MEM_SHARE * avail / GiB),
            f"{HOST_MEM_SHARE:.0%} of {how} when calibrate ran (the rest left to the training "
            f"process), not a pinning test, {b.date}")


def matmul_tflops(b: Bench) -> Figure:
    """Achieved matmul rate: total FLOPs / total median time over a few layer-like shapes."""
    if b.cuda:
        dtype = torch.bfloat16
        shapes = [(4096, 4096, 4096), (8192, 4096, 11008)] if b.quick else \
            [(4096, 4096, 4096), (8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096)]
    else:
        dtype = torch.float32
        shapes = [(1024, 1024, 1024)] if b.quick else \
            [(1024, 1024, 1024), (2048, 1024, 2752), (2048, 2752, 1024)]
    flops = secs = 0.0
    for m, k, n in shapes:
        x = torch.randn(m, k, device=b.device, dtype=dtype)
        w = torch.randn(k, n, device=b.device, dtype=dtype)
        out = torch.empty(m, n, device=b.device, dtype=dtype)
        secs += b.seconds(lambda: torch.mm(x, w, out=out))
        flops += 2.0 * m * k * n
    dims = ", ".join(f"{m}x{k}x{n}" for m, k, n in shapes)
    return _sig(flops / secs / 1e12), b.measured(
        f"{str(dtype).removeprefix('torch.')} torch.mm at {dims} (MxKxN; total FLOPs / total time)")


def peak_tflops(b: Bench, matmul: Figure) -> Figure:
    if b.cuda:
        for pattern, tflops, citation in DATASHEET_BF16_TFLOPS:
            if pattern.lower() in b.name.lower():
                return tflops, f"datasheet dense bf16: {citation}, halved"
        return matmul[0], (f"no datasheet entry for {b.name} in memoplan: the measured bf16 "
                           f"matmul rate (matmul_tflops)")
    return matmul[0], "a CPU has no datasheet figure here: the measured matmul rate (matmul_tflops)"


def attention_tflops(b: Bench) -> tuple[Figure, Figure]:
    """Causal F.scaled_dot_product_attention, forward and backward, FLOPs counted as memoplan
    counts causal attention: forward 2*B*H*S*S*(d+dv)/2, backward twice that."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if b.cuda:
        dtype, heads, dim = torch.bfloat16, 32, 128
        lengths = [8192, 16384] if b.quick else [8192, 16384, 32768]
    else:
        dtype, heads, dim = torch.float32, 8, 128
        lengths = [512] if b.quick else [512, 1024, 2048]
    flash = b.cuda  # the kernel a bf16 model runs on a GPU; the CPU's default otherwise
    kernel = "flash kernel" if flash else "default SDPA kernel"
    fwd_flops = fwd_s = bwd_s = 0.0
    for s in lengths:
        q, k, v = (torch.randn(1, heads, s, dim, device=b.device, dtype=dtype, requires_grad=True)
                   for _ in range(3))

        def sdpa(q=q, k=k, v=v) -> torch.Tensor:
            if flash:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        try:
            out = sdpa()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # no flash kernel for this GPU: what SDPA picks by itself
            flash, kernel = False, "default SDPA kernel (flash unavailable)"
            out = sdpa()
        grad = torch.randn_like(out)

        def forward(sdpa=sdpa) -> None:
            with torch.no_grad():
                sdpa()

        fwd_s += b.seconds(forward)
        bwd_s += b.seconds(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
        fwd_flops += 2.0 * heads * s * s * (dim + dim) / 2
        del q, k, v, out, grad
    detail = (f"causal F.scaled_dot_product_attention, {kernel}, "
              f"{str(dtype).removeprefix('torch.')}, batch 1, {heads} heads, dim {dim}, "
              f"S = {', '.join(map(str, lengths))} (FLOPs as memoplan counts causal attention: "
              f"forward 2*B*H*S*S*(d+dv)/2, backward twice that; total FLOPs / total time)")
    return ((_sig(fwd_flops / fwd_s / 1e12), b.measured("forward of " + detail)),
            (_sig(2 * fwd_flops / bwd_s / 1e12), b.measured("backward of " + detail)))


def hbm_gbps(b: Bench) -> Figure:
    """Elementwise bandwidth: out = a + b on large tensors, bytes read + written / s."""
    dtype = torch.bfloat16 if b.cuda else torch.float32
    nbytes = (256 * MiB if b.quick else GiB) if b.cuda else (128 * MiB if b.quick else 256 * MiB)
    n = nbytes // dtype.itemsize
    x, y, out = (torch.ones(n, device=b.device, dtype=dtype) for _ in range(3))
    secs = b.seconds(lambda: torch.add(x, y, out=out))
    return _sig(3 * nbytes / secs / 1e9), b.measured(
        f"torch.add(a, b, out=c) on three {nbytes // MiB} MiB {str(dtype).removeprefix('torch.')} "
        f"tensors, 3 x {nbytes // MiB} MiB read + written per add")


def copy_gbps(b: Bench) -> dict[str, Figure]:
    """D2H, H2D and both at once. On CUDA: pinned host buffers, non_blocking copies, duplex as
    one D2H and one H2D on two streams at once (total bytes / s). On a CPU: memcpy between two
    large tensors, as the CPU's own "offload" is."""
    nbytes = (256 * MiB if b.quick else GiB) if b.cuda else (128 * MiB if b.quick else 256 * MiB)
    mib = nbytes // MiB
    if b.cuda:
        dev_a, dev_b = (torch.ones(nbytes, dtype=torch.uint8, device=b.device) for _ in range(2))
        host_a, host_b = (torch.ones(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2))
        s1, s2 = torch.cuda.Stream(b.device), torch.cuda.Stream(b.device)

        def d2h() -> None:
            host_a.copy_(dev_a, non_blocking=True)

        def h2d() -> None:
            dev_b.copy_(host_b, non_blocking=True)

        def both() -> None:
            with torch.cuda.stream(s1):
                d2h()
            with torch.cuda.stream(s2):
                h2d()

        how = f"{mib} MiB pinned host buffer, non_blocking copy_"
        duplex_how = f"one D2H and one H2D of {mib} MiB on two streams at once, total bytes / s"
    else:
        src, dst, src2, dst2 = (torch.ones(nbytes, dtype=torch.uint8) for _ in range(4))

        def d2h() -> None:
            dst.copy_(src)

        def h2d() -> None:
            src.copy_(dst)

        def both() -> None:
            dst.copy_(src)
            dst2.copy_(src2)

        how = f"no PCIe on a CPU: memcpy between two {mib} MiB tensors, bytes copied / s"
        duplex_how = (f"no PCIe on a CPU: two {mib} MiB memcpys sharing the memory bus, "
                      f"total bytes copied / s")
    d2h_s, h2d_s, both_s = b.seconds(d2h), b.seconds(h2d), b.seconds(both)
    return {"d2h_gbps": (_sig(nbytes / d2h_s / 1e9), b.measured(f"device to host, {how}")),
            "h2d_gbps": (_sig(nbytes / h2d_s / 1e9), b.measured(f"host to device, {how}")),
            "duplex_gbps": (_sig(2 * nbytes / both_s / 1e9), b.measured(duplex_how))}


def pcie_node_gbps(b: Bench, d2h: Figure, gpus: int) -> Figure:
    if b.cuda:
        return _sig(d2h[0] * gpus), (
            f"not measured with all GPUs copying: d2h_gbps of one GPU x {gpus} GPUs (an upper "
            f"bound; GPUs behind a shared PCIe switch or host link get less together)")
    return d2h[0], "a CPU is one device: same as d2h_gbps"


def pin_s_per_gib(b: Bench) -> Figure:
    """Seconds to page-lock 1 GiB with cudaHostRegister, as the runtime pins its host slab:
    a fresh buffer whose pages were never touched, registered at its exact size."""
    if not b.cuda:
        return 0.0, "no pinning on a CPU device: host copies need no page-locked memory"
    cudart = torch.cuda.cudart()
    nbytes = 256 * MiB if b.quick else GiB
    page = mmap.PAGESIZE
    times = []
    with torch.cuda.device(b.device):
        for i in range(b.reps + 1):  # the first registration is a warm-up
            size = 2 * MiB if i == 0 else nbytes
            buf = torch.empty(size + page, dtype=torch.uint8)
            ptr = buf.data_ptr() + (-buf.data_ptr() % page)
            t0 = time.perf_counter()
            rc = int(cudart.cudaHostRegister(ptr, size, 1))
            secs = time.perf_counter() - t0
            if rc != 0:
                raise MemoplanError(
                    f"cudaHostRegister of {size // MiB} MiB failed (error {rc}): this host cannot "
                    f"pin memory (too little free memory, or 'ulimit -l' too low).")
            cudart.cudaHostUnregister(ptr)
            del buf
            if i:
                times.append(secs)
    return _sig(statistics.median(times) * GiB / nbytes), b.measured(
        f"cudaHostRegister of a fresh {nbytes // MiB} MiB buffer (pages not touched before), "
        f"median of {b.reps}")


# --- all of them ---------------------------------------------------------------------------

def calibrate(device: str = "cpu", quick: bool = False,
              progress: Progress | None = None) -> dict:
    """Measure every figure on ``device`` and return the hardware file's dict: the figures in
    :data:`FIELDS` order, then ``sources`` (field -> how it was obtained)."""
    dev = check_device(device)
    progress = progress or (lambda what, done, total: None)
    name, name_source = device_name(dev)
    b = Bench(device=dev, name=name, quick=quick, date=datetime.date.today().isoformat())
    figs: dict[str, Figure] = {"name": (name, name_source)}
    steps: list[tuple[str, Callable[[], dict[str, Figure]]]] = [
        ("memory sizes", lambda: {"gpus_per_node": gpus_per_node(b), "gpu_mem_gb": gpu_mem_gb(b),
                                  "host_mem_gb": host_mem_gb(b)}),
        ("matmul", lambda: {"matmul_tflops": matmul_tflops(b)}),
        ("attention", lambda: dict(zip(("attn_fwd_tflops", "attn_bwd_tflops"),
                                       attention_tflops(b)))),
        ("elementwise bandwidth", lambda: {"hbm_gbps": hbm_gbps(b)}),
        ("host copies", lambda: copy_gbps(b)),
        ("pinning", lambda: {"pin_s_per_gib": pin_s_per_gib(b)}),
    ]
    for i, (what, step) in enumerate(steps):
        progress(what, i, len(steps))
        figs.update(step())
        if b.cuda:
            torch.cuda.empty_cache()
    progress("done", len(steps), len(steps))
    figs["peak_tflops"] = peak_tflops(b, figs["matmul_tflops"])
    figs["pcie_node_gbps"] = pcie_node_gbps(b, figs["d2h_gbps"], figs["gpus_per_node"][0])
    for field in FIELDS[1:]:
        value = figs[field][0]
        if not math.isfinite(value) or value < 0:  # a timer gone wrong, not the user's doing
            raise RuntimeError(f"calibrate measured {field} = {value}")
    hw: dict[str, Any] = {field: figs[field][0] for field in FIELDS}
    hw["sources"] = {field: figs[field][1] for field in FIELDS}
    return hw
