"""Fake (shape-only) kernels that torch's own lack, registered once before the first trace.

``aten._grouped_mm`` (the default experts implementation of transformers' MoE layers, Mixtral
and Qwen2-MoE) runs in float32 on a CPU, forward and backward, but torch's meta kernel accepts
only bfloat16, so a float32 layer cannot be traced on fake tensors. Ours gives the same shapes
for any dtype and defers to torch's for bfloat16. It is registered for the process (a
registration cannot be undone cleanly) and is only more permissive than torch's.
"""

from __future__ import annotations

import torch

_registered: list[torch.library.Library] = []  # kept alive: dropping a Library unregisters


def _fake_grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    from torch._meta_registrations import meta_grouped_mm

    if mat_a.dtype == torch.bfloat16 and mat_b.dtype == torch.bfloat16:
        return meta_grouped_mm(mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype)
    torch._check(mat_a.dtype == mat_b.dtype,
                 lambda: f"_grouped_mm: dtypes differ ({mat_a.dtype}, {mat_b.dtype})")
    a2, b2 = mat_a.dim() == 2, mat_b.dim() == 2
    if a2 and b2:
        size = [offs.size(0), mat_a.size(0), mat_b.size(1)]
    elif a2:
        size = [mat_a.size(0), mat_b.size(-1)]
    elif b2:
        size = [mat_a.size(1), mat_b.size(1)]
    else:
        size = [mat_a.size(0), mat_a.size(1), mat_b.size(-1)]
    return mat_a.new_empty(size, dtype=out_dtype or mat_a.dtype)


def register_fake_kernels() -> None:
    """Register the kernels above (once per process; later calls do nothing)."""
    if _registered or not hasattr(torch.ops.aten, "_grouped_mm"):
        return
    lib = torch.library.Library("aten", "FRAGMENT")
    try:
        torch.library.register_fake("aten::_grouped_mm", _fake_grouped_mm, lib=lib)
    except Exception:  # noqa: BLE001  (a torch that refuses it keeps its own kernel)
        return
    _registered.append(lib)
