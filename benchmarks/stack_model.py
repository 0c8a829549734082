"""A memoplan model file: the llama example's decoder layers alone, fed random hidden states.

This is what ``runtime_bench.py`` trains (and what ``../shared/reference/h200-baselines.md``
measured): no embedding, LM head or loss over a vocabulary, so the plan's budget outside the
arena (``pool_bytes``) is that of this stack, not of the whole model. The preset comes from
``MEMOPLAN_PRESET`` and ``MEMOPLAN_LAYERS``, as for ``examples/llama/model.py``::

    MEMOPLAN_PRESET=7b MEMOPLAN_LAYERS=2 memoplan profile benchmarks/stack_model.py --seq 256
"""

import importlib.util
from pathlib import Path

import torch
import torch.utils.checkpoint

_spec = importlib.util.spec_from_file_location(
    "memoplan_stack_llama", Path(__file__).resolve().parents[1] / "examples" / "llama" / "model.py")
llama = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llama)


class Stack(torch.nn.Module):
    """The decoder layers; RoPE tables made from the input's length, as the full model does."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.layers = model.layers
        self.cfg = model.cfg

    def forward(self, x, cos=None, sin=None, strategy: str = "keep"):
        if cos is None:
            cfg = self.cfg
            cos, sin = llama.rope_cos_sin(x.shape[1], cfg.dim // cfg.n_heads, cfg.rope_theta,
                                          x.device, x.dtype)
        for layer in self.layers:
            x = (torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
                 if strategy == "recompute" else layer(x, cos, sin))
        return x


def build_model() -> torch.nn.Module:
    return Stack(llama.build_model())


def example_inputs(seq_len: int):
    cfg = llama.config()
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, seq_len, cfg.dim, generator=g).to(cfg.dtype).requires_grad_(),)
