"""Hardware descriptions: what the cost model (``solve.swap``) assumes about a machine.

A :class:`Hardware` is per GPU except ``host_mem_gb`` and ``pcie_node_gbps``, which are per node
and shared by its ``gpus_per_node`` GPUs (memoplan divides them among the GPUs that copy at
once). Rates are what kernels achieve, not datasheet peaks, except ``peak_tflops`` (the
datasheet's dense bf16 figure, MFU's denominator). Every figure says where it comes from in
``sources``: a datasheet, a measurement with its command, or a cited source.

Attention FLOPs are counted as the profile counts them: causal attention as half of full
(what the flash kernel computes: it skips masked blocks), backward as twice forward (the
kernel's backward also recomputes the scores, 2.5x forward, so its own FLOP/s is 1.25x
``attn_bwd_tflops``). ``memoplan calibrate`` counts them the same way.

A hardware file (``memoplan solve --hw FILE.json``; ``memoplan calibrate`` writes one) is a
JSON object with exactly the fields of :class:`Hardware`: ``name``, ``gpus_per_node``,
``gpu_mem_gb``, ``host_mem_gb``, ``peak_tflops``, ``matmul_tflops``, ``attn_fwd_tflops``,
``attn_bwd_tflops``, ``hbm_gbps``, ``d2h_gbps``, ``h2d_gbps``, ``duplex_gbps``,
``pcie_node_gbps``, ``pin_s_per_gib`` and ``sources`` (field -> text); other keys are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from memoplan.errors import MemoplanError


@dataclass(frozen=True, kw_only=True)
class Hardware:
    name: str
    gpus_per_node: int        # GPUs sharing one node's host memory and host links
    gpu_mem_gb: float         # per GPU, GiB usable by the process
    host_mem_gb: float        # per node, GiB that may hold (pinned) offloaded activations
    peak_tflops: float        # dense bf16 per GPU, datasheet (MFU's denominator)
    matmul_tflops: float      # achieved bf16 matmul
    attn_fwd_tflops: float    # achieved fused attention forward (FLOPs as the profile counts)
    attn_bwd_tflops: float    # achieved fused attention backward (likewise)
    hbm_gbps: float           # achieved device memory bandwidth, bytes read + written per s
    d2h_gbps: float           # pinned device-to-host GB/s of ONE GPU copying alone
    h2d_gbps: float           # pinned host-to-device, likewise
    duplex_gbps: float        # one GPU copying both ways at once, both directions together
    pcie_node_gbps: float     # what all GPUs of a node reach together, one direction
    pin_s_per_gib: float      # seconds to pin (cudaHostRegister) 1 GiB of host memory
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def pcie_gbps(self) -> float:
        """Older name of ``d2h_gbps``."""
        return self.d2h_gbps

    @property
    def flops_per_s(self) -> float:
        """The matmul rate in FLOP/s: what ``memoplan profile`` divides a layer's FLOPs by for
        its CPU time estimate (``solve`` uses the per-class model of ``solve.swap``)."""
        return self.matmul_tflops * 1e12

    def pcie_bytes_per_s(self, gpus_sharing: int) -> float:
        """Bytes/s one GPU copies in one direction while ``gpus_sharing`` GPUs of its node copy
        at once: the slower direction alone (forward copies out, backward copies in; the
        schedule runs them one way at a time), at most its share of the node's."""
        per_gpu = min(self.d2h_gbps, self.h2d_gbps, self.pcie_node_gbps / max(1, gpus_sharing))
        return per_gpu * 1e9

    def host_bytes_per_gpu(self, gpus_sharing: int) -> float:
        return self.host_mem_gb * 2**30 / max(1, gpus_sharing)

    def pin_seconds(self, nbytes: float) -> float:
        """Seconds to pin ``nbytes`` of host memory (once, when the runtime sets up its slab)."""
        return nbytes / 2**30 * self.pin_s_per_gib

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FIGURES = tuple(f.name for f in fields(Hardware) if f.name not in ("name", "sources"))
# a CPU calibration pins nothing: 0 seconds per GiB is a valid figure
MAY_BE_ZERO = ("pin_s_per_gib",)

# ---- presets -------------------------------------------------------------------------------

_BASELINES = "../shared/reference/h200-baselines.md (script h200_baselines.py beside it)"
_MEASURED = f"measured on one H200 (torch 2.11, CUDA 13), {_BASELINES}"
_FIT = ("fitted to the keep-all and full-recompute seconds per layer at 32K and 128K of "
        f"{_BASELINES}, with the model of tests/models/h200_stack.py; 16K and 64K predicted "
        "within 4% (tests/test_cost_model.py)")
_DGX_H = ("each GPU has its own PCIe Gen5 x16 link to a CPU through its ConnectX-7 (no PCIe "
          "switch shared by two GPUs: NVIDIA's GTC 2022 DGX A100/H100 block diagrams, shown in "
          "vengineer.hatenablog.com/entry/2022/05/02/090000; a DGX H200 is the same system with "
          "H200s), so 8 x d2h_gbps; not measured with "
          "8 GPUs copying at once (host DRAM, 2 x 8 channels DDR5-4800 = 614 GB/s theoretical, "
          "is the next limit)")
_SAME_FRACTION = "estimate, not measured: the H200's measured fraction of its datasheet figure "

_H200_RATES = dict(matmul_tflops=773.0, attn_fwd_tflops=334.0, attn_bwd_tflops=233.0,
                   hbm_gbps=4200.0, d2h_gbps=55.3, h2d_gbps=55.0, duplex_gbps=98.6,
                   pin_s_per_gib=0.465, peak_tflops=989.0)
_H200_SOURCES = {
    "peak_tflops": "datasheet: NVIDIA H200 SXM, BF16 Tensor Core 1,979 TFLOP/s with sparsity, "
                   "989 dense",
    "matmul_tflops": f"{_MEASURED}: bf16 8192^3 torch matmul, median of 10",
    "attn_fwd_tflops": f"{_FIT}; FlashAttention-3's paper (arXiv 2407.08608, fig. 5) has "
                       f"FlashAttention-2 causal forward, head dim 128, 16K at 335 on an H100",
    "attn_bwd_tflops": f"{_FIT} (the kernel's own count, with its recomputed scores: 291)",
    "hbm_gbps": f"{_MEASURED}: device-to-device copy of 4 GiB, bytes read + written "
                f"(datasheet 4.8 TB/s)",
    "d2h_gbps": f"{_MEASURED}: pinned 4 GiB device-to-host copy (PCIe Gen5 x16)",
    "h2d_gbps": f"{_MEASURED}: pinned 4 GiB host-to-device copy",
    "duplex_gbps": f"{_MEASURED}: 2 GiB each way on two streams at once, total",
    "pin_s_per_gib": f"{_MEASURED}: torch.empty(4 GiB, pin_memory=True) took 1.86 s",
    "gpu_mem_gb": "datasheet: 141 GB HBM3e; about 139 GiB usable on the H200 measured",
}


def _preset(name: str, sources: dict[str, str], **figures: float | int) -> Hardware:
    hw = Hardware(name=name, sources=sources, **figures)
    missing = [f for f in FIGURES if f not in sources]
    assert not missing, f"preset {name} gives no source for {missing}"
    return hw


def _dgx_hopper(name: str, gpu: str, gpu_mem_gb: float, hbm_datasheet: float) -> Hardware:
    hbm = round(hbm_datasheet * 4200 / 4800)
    is_h200 = gpu == "H200"
    return _preset(
        name, {
            **_H200_SOURCES,
            "gpus_per_node": f"datasheet: NVIDIA DGX {gpu}, 8 {gpu} GPUs",
            "host_mem_gb": f"datasheet: DGX {gpu}, 2 TB system memory; 1800 of its 2048 GiB for "
                           f"activations (the share the measured box leaves: 110 of 125 GiB)",
            "pcie_node_gbps": _DGX_H,
            **({} if is_h200 else {
                "peak_tflops": "datasheet: NVIDIA H100 SXM, BF16 Tensor Core 1,979 TFLOP/s with "
                               "sparsity, 989 dense",
                "gpu_mem_gb": "datasheet: 80 GB HBM3; about 79 GiB usable",
                "matmul_tflops": f"assumed equal to the H200's (same GH100 die, clocks and 700 W): "
                                 f"{_H200_SOURCES['matmul_tflops']}",
                "attn_fwd_tflops": "assumed equal to the H200's (same die): "
                                   + _H200_SOURCES["attn_fwd_tflops"],
                "attn_bwd_tflops": "assumed equal to the H200's (same die): "
                                   + _H200_SOURCES["attn_bwd_tflops"],
                "hbm_gbps": f"{_SAME_FRACTION}(4.2 of 4.8 TB/s) of the H100 SXM's 3.35 TB/s",
                "d2h_gbps": "assumed equal to the H200's (PCIe Gen5 x16): "
                            + _H200_SOURCES["d2h_gbps"],
                "h2d_gbps": "assumed equal to the H200's: " + _H200_SOURCES["h2d_gbps"],
                "duplex_gbps": "assumed equal to the H200's: " + _H200_SOURCES["duplex_gbps"],
                "pin_s_per_gib": "assumed equal to the H200 box's (host-side page locking): "
                                 + _H200_SOURCES["pin_s_per_gib"],
            })},
        **{**_H200_RATES, "hbm_gbps": float(hbm)}, gpus_per_node=8, gpu_mem_gb=gpu_mem_gb,
        host_mem_gb=1800.0, pcie_node_gbps=8 * 55.3)


def _ampere(name: str, gpu: str, host_source: str) -> Hardware:
    """An 8-GPU node of 80 GB A100s or A800s (same compute, memory and PCIe Gen4 x16; the
    A800's NVLink is slower, which no figure here uses)."""
    gen4 = 31.5 / 63.0  # PCIe Gen4 x16 over Gen5 x16, per direction
    f = {"matmul_tflops": float(round(312 * 773 / 989)),
         "hbm_gbps": float(round(2039 * 4200 / 4800)), "d2h_gbps": round(55.3 * gen4, 1),
         "h2d_gbps": round(55.0 * gen4, 1), "duplex_gbps": round(98.6 * gen4, 1),
         "attn_fwd_tflops": float(round(0.60 * 312))}
    f["attn_bwd_tflops"] = float(round(f["attn_fwd_tflops"] * 233 / 334))
    gen4_note = "estimate, not measured: the H200's measured PCIe Gen5 x16 figure x 31.5/63 (Gen4)"
    return _preset(
        name, {
            "gpus_per_node": f"8 {gpu} 80GB per node ({host_source})",
            "gpu_mem_gb": "datasheet: 80 GB HBM2e; about 79 GiB usable",
            "host_mem_gb": f"2 TB per node ({host_source}); 1800 of 2048 GiB for activations "
                           f"(the share the measured box leaves: 110 of 125 GiB)",
            "peak_tflops": f"datasheet: NVIDIA {gpu}, BF16 Tensor Core 312 TFLOP/s dense",
            "matmul_tflops": f"{_SAME_FRACTION}(773 of 989) of 312",
            "attn_fwd_tflops": "estimate, not measured: 60% of 312, inside FlashAttention-2's "
                               "50-73% of A100 peak (arXiv 2307.08691, abstract)",
            "attn_bwd_tflops": "estimate, not measured: attn_fwd_tflops x 233/334, the H200's "
                               "fitted backward/forward ratio",
            "hbm_gbps": f"{_SAME_FRACTION}(4.2 of 4.8 TB/s) of the 80GB SXM's 2,039 GB/s",
            "d2h_gbps": gen4_note, "h2d_gbps": gen4_note, "duplex_gbps": gen4_note,
            "pcie_node_gbps": "four PCIe Gen4 switches, each with two GPUs (and two NICs) behind "
                              "one x16 uplink (DGX/HGX A100 topology; NVIDIA GDS docs, 'Validate "
                              "PCI Switch System Topology': GPUs and NICs under the same switch "
                              "on a DGX A100), so 4 x d2h_gbps; not measured",
            "pin_s_per_gib": "assumed equal to the H200 box's (host-side page locking): "
                             + _H200_SOURCES["pin_s_per_gib"],
        },
        **f, gpus_per_node=8, gpu_mem_gb=79.0, host_mem_gb=1800.0, peak_tflops=312.0,
        pcie_node_gbps=round(4 * f["d2h_gbps"], 1), pin_s_per_gib=0.465)


PRESETS: dict[str, Hardware] = {
    "h200": _dgx_hopper("h200", "H200", 139.0, 4800),
    # the single-GPU box of h200-baselines.md: 125 GiB of host memory, ~110 GiB of it usable
    "h200-box": _preset(
        "h200-box", {
            **_H200_SOURCES,
            "gpus_per_node": f"the box measured in {_BASELINES}: one H200",
            "host_mem_gb": f"{_BASELINES}: 125 GiB host memory, about 110 GiB of it for "
                           f"activations (the rest for the OS and the training process)",
            "pcie_node_gbps": "one GPU: its own d2h_gbps",
        },
        **_H200_RATES, gpus_per_node=1, gpu_mem_gb=139.0, host_mem_gb=110.0,
        pcie_node_gbps=55.3),
    "h100": _dgx_hopper("h100", "H100", 79.0, 3350),
    "a800": _ampere("a800", "A800", "the MEMO paper's machine, "
                    "../shared/reference/memo-technique.md: A800 GPUs, 8 per node, 2 TB host "
                    "memory per node"),
    "a100": _ampere("a100", "A100", "datasheet: NVIDIA DGX A100 640GB, 2 TB system memory"),
}

# CLI override options (--pcie-gbps ...) -> Hardware fields
_OVERRIDES = ("pcie_gbps", "host_mem_gb", "gpu_mem_gb", "peak_tflops")


def load_hardware(path: str | Path) -> Hardware:
    """A hardware file (module docstring); a missing, non-numeric or non-positive figure is an
    error (exit 2) naming the field."""
    path = Path(path)
    if not path.is_file():
        raise MemoplanError(f"No hardware file at '{path}'. Pass a preset ({', '.join(PRESETS)}) "
                            f"or the path of a JSON file (memoplan calibrate writes one).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MemoplanError(f"The hardware file '{path}' is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise MemoplanError(f"The hardware file '{path}' must hold a JSON object with the fields "
                            f"name, {', '.join(FIGURES)} and sources.")

    def bad(what: str) -> MemoplanError:
        return MemoplanError(f"The hardware file '{path}': {what}. Its fields are name, "
                             f"{', '.join(FIGURES)} (positive numbers; pin_s_per_gib may be 0) and "
                             f"sources.")

    given: dict[str, Any] = {}
    for name in ("name", *FIGURES):
        if name not in data:
            raise bad(f"'{name}' is missing")
        value = data[name]
        if name == "name":
            if not isinstance(value, str) or not value:
                raise bad(f"'name' must be a non-empty string, got {value!r}")
        elif (isinstance(value, bool) or not isinstance(value, (int, float))
              or not math.isfinite(value) or value < 0
              or (value == 0 and name not in MAY_BE_ZERO)):
            raise bad(f"'{name}' must be a positive number, got {value!r}")
        elif name == "gpus_per_node" and value != int(value):
            raise bad(f"'gpus_per_node' must be a whole number, got {value!r}")
        given[name] = int(value) if name == "gpus_per_node" else value
    sources = data.get("sources", {})
    if not isinstance(sources, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in sources.items()):
        raise bad("'sources' must map field names to texts")
    return Hardware(**given, sources=dict(sources))


def get_hardware(name: str, **overrides: float | int | None) -> Hardware:
    """A preset by name, or a hardware file by path, with explicit overrides (``None`` values
    are ignored; ``pcie_gbps`` sets both copy directions, and the node's figure when it is not
    given). Each overridden figure's source says so."""
    if name.lower() in PRESETS:
        hw = PRESETS[name.lower()]
    elif name.endswith(".json") or Path(name).is_file():
        hw = load_hardware(name)
    else:
        raise MemoplanError(f"Unknown hardware preset '{name}'. Known: {', '.join(PRESETS)}; or "
                            f"pass the path of a hardware JSON file (memoplan calibrate writes "
                            f"one); override single figures with --pcie-gbps, --host-mem-gb, "
                            f"--gpu-mem-gb, --peak-tflops.")
    given = {k: v for k, v in overrides.items() if v is not None}
    for k, v in given.items():
        if k not in _OVERRIDES and k not in FIGURES:
            raise TypeError(f"get_hardware() got an unknown figure {k!r}")
        if v <= 0:
            raise MemoplanError(f"--{k.replace('_', '-')} must be positive, got {v}.")
    option = {k: k for k in given}
    if "pcie_gbps" in given:
        pcie = given.pop("pcie_gbps")
        derived = {"d2h_gbps": pcie, "h2d_gbps": pcie,
                   "duplex_gbps": hw.duplex_gbps * pcie / hw.d2h_gbps}
        if "pcie_node_gbps" not in given:
            derived["pcie_node_gbps"] = pcie * hw.gpus_per_node
        given.update(derived)
        option.update(dict.fromkeys(derived, "pcie_gbps"))
    sources = {**hw.sources, **{k: f"overridden with --{option[k].replace('_', '-')} (the "
                                   f"{hw.name} figure was {getattr(hw, k):g})" for k in given}}
    return replace(hw, **given, sources=sources)
