"""Tiny Hugging Face models in their default configurations, as a new user writes them: only the
sizes are set (everything else, ``use_cache``, dropout, attention and experts implementations,
is transformers' default). The architecture comes from ``MEMOPLAN_HF_ARCH`` (default "llama")."""

import os

import torch

ARCHS = ["llama", "qwen3", "mistral", "gemma2", "phi3", "gpt_neox", "olmo2", "gpt2", "bert",
         "falcon", "t5", "mixtral", "qwen2_moe"]
VOCAB = 256

_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
SIZES = {
    "llama": _DECODER, "qwen3": dict(_DECODER, head_dim=16), "mistral": _DECODER,
    "gemma2": dict(_DECODER, head_dim=16), "phi3": dict(_DECODER, pad_token_id=0),
    "olmo2": _DECODER,
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=2048),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=2048),
    "bert": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=2048),
    "falcon": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
    "t5": dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4),
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64),
}


def arch() -> str:
    name = os.environ.get("MEMOPLAN_HF_ARCH", "llama")
    if name not in SIZES:
        raise ValueError(f"unknown MEMOPLAN_HF_ARCH {name!r}; known: {sorted(SIZES)}")
    return name


def build_model():
    import transformers as tf

    name = arch()
    cfg = tf.AutoConfig.for_model(name, **SIZES[name])
    torch.manual_seed(0)
    if name == "bert":
        model = tf.BertForMaskedLM(cfg)
    elif name == "t5":
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.train()


def example_inputs(seq_len: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(VOCAB, (1, seq_len), generator=g)
    if arch() == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(VOCAB, (1, seq_len), generator=g)}
    return {"input_ids": ids}


def loss_fn(output):
    return output.logits.float().pow(2).mean()
