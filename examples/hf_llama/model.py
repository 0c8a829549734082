"""A tiny Hugging Face ``transformers.LlamaForCausalLM`` (random weights, no download).

A memoplan *model file*: it defines ``build_model()``, ``example_inputs(seq_len)`` (a dict of
keyword arguments: ``{"input_ids": ...}``), ``loss_fn(output)``, a ``PRESETS`` dict and a
per-preset ``DTYPE``. The repeated layer is transformers' ``LlamaDecoderLayer``; the profiler
finds it by itself, so ``LAYER`` is not set. It checks that memoplan handles a real library
model: keyword inputs, a ``ModelOutput`` result, rotary embeddings computed in the model.

Profile it with::

    memoplan profile examples/hf_llama/model.py

Only the "tiny" preset exists (``MEMOPLAN_PRESET`` other than "tiny" raises ValueError).
"""

import os

import torch
import torch.nn as nn

PRESETS = {
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        dtype=torch.float32,
    ),
}


def preset_name() -> str:
    name = os.environ.get("MEMOPLAN_PRESET", "tiny")
    if name not in PRESETS:
        raise ValueError(
            f"unknown MEMOPLAN_PRESET {name!r} for {__file__}; known presets: {sorted(PRESETS)}"
        )
    return name


def config() -> dict:
    return PRESETS[preset_name()]


def __getattr__(name):
    # Module-level ``DTYPE``: the dtype of the preset chosen *now* (tiny: float32).
    if name == "DTYPE":
        return config()["dtype"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    p = dict(config())
    dtype = p.pop("dtype")
    cfg = LlamaConfig(
        **p,
        attention_dropout=0.0,  # Llama's only dropout; keep it off so train mode is deterministic
        use_cache=False,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    return model.train()


def example_inputs(seq_len: int):
    p = config()
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(p["vocab_size"], (1, seq_len), generator=g)}


def loss_fn(output):
    return output.logits.float().pow(2).mean()
