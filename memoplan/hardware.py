"""Hardware presets: what the cost model and the CPU time estimate assume about a machine.

Figures are per GPU except ``host_mem_gb`` and ``pcie_gbps``, which are per node and shared by
its ``gpus_per_node`` GPUs (memoplan divides them). ``efficiency`` is the fraction of
``peak_tflops`` a transformer layer achieves (calibrated for H200 on the keep-all rows of
shared/reference/h200-baselines.md: MFU 0.32-0.45 at 16K-128K).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memoplan.errors import MemoplanError


@dataclass(frozen=True, kw_only=True)
class Hardware:
    name: str
    peak_tflops: float        # dense bf16, per GPU (datasheet)
    efficiency: float         # achieved fraction of peak on a transformer layer
    gpu_mem_gb: float         # per GPU, GiB usable by the process
    pcie_gbps: float          # pinned device<->host GB/s of ONE GPU when it copies alone
    pcie_node_gbps: float     # what all GPUs of a node reach together (shared switches / host)
    host_mem_gb: float        # per node, GiB that may hold offloaded activations
    gpus_per_node: int = 8

    @property
    def flops_per_s(self) -> float:
        """Achieved FLOP/s of one GPU on a layer."""
        return self.peak_tflops * 1e12 * self.efficiency

    def pcie_bytes_per_s(self, gpus_sharing: int) -> float:
        """D2H bandwidth one GPU gets while ``gpus_sharing`` GPUs of its node copy at once."""
        per_gpu = min(self.pcie_gbps, self.pcie_node_gbps / max(1, gpus_sharing))
        return per_gpu * 1e9

    def host_bytes_per_gpu(self, gpus_sharing: int) -> float:
        return self.host_mem_gb * 2**30 / max(1, gpus_sharing)


PRESETS: dict[str, Hardware] = {
    # measured on one H200 box (shared/reference/h200-baselines.md): 55 GB/s pinned D2H,
    # 125 GiB host memory of which ~110 GiB can hold activations.
    "h200": Hardware(name="h200", peak_tflops=989.0, efficiency=0.40, gpu_mem_gb=139.0,
                     pcie_gbps=55.0, pcie_node_gbps=220.0, host_mem_gb=110.0, gpus_per_node=8),
    "h100": Hardware(name="h100", peak_tflops=989.0, efficiency=0.40, gpu_mem_gb=79.0,
                     pcie_gbps=50.0, pcie_node_gbps=200.0, host_mem_gb=1800.0, gpus_per_node=8),
    # the paper's machines: A800 80 GB, 8 per node, 2 TB host memory per node, PCIe 4.0.
    "a800": Hardware(name="a800", peak_tflops=312.0, efficiency=0.55, gpu_mem_gb=79.0,
                     pcie_gbps=25.0, pcie_node_gbps=100.0, host_mem_gb=1800.0, gpus_per_node=8),
    "a100": Hardware(name="a100", peak_tflops=312.0, efficiency=0.55, gpu_mem_gb=79.0,
                     pcie_gbps=25.0, pcie_node_gbps=100.0, host_mem_gb=1800.0, gpus_per_node=8),
}


def get_hardware(name: str, **overrides: float | int | None) -> Hardware:
    """A preset by name with explicit overrides (``None`` values are ignored)."""
    try:
        hw = PRESETS[name.lower()]
    except KeyError:
        raise MemoplanError(f"Unknown hardware preset '{name}'. Known: {', '.join(PRESETS)}; "
                            f"override single figures with --pcie-gbps, --host-mem-gb, "
                            f"--gpu-mem-gb, --peak-tflops.") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    for k, v in given.items():
        if v <= 0:
            raise MemoplanError(f"--{k.replace('_', '-')} must be positive, got {v}.")
    if "pcie_gbps" in given and "pcie_node_gbps" not in given:
        given["pcie_node_gbps"] = given["pcie_gbps"] * hw.gpus_per_node
    return replace(hw, **given)
