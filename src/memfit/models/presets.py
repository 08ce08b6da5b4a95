"""Llama-architecture size presets for from-scratch training.

`llama-60m` / `llama-130m` / `llama-350m` follow the configs used by GaLore (Zhao et al. 2024) and APOLLO
(Zhu et al. 2024) for C4 pre-training; the smaller ones are for laptops and tests. `vocab_size` is set from
the tokenizer at build time.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from memfit.errors import ModelError

PRESETS: dict[str, dict[str, int]] = {
    # name: hidden, intermediate, layers, heads, kv_heads
    "llama-tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    "llama-1m": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4),
    "llama-20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=6),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=16),
}


def llama_config(preset: str, vocab_size: int, max_position_embeddings: int = 2048, **overrides) -> LlamaConfig:
    """The `LlamaConfig` of a named preset (tied embeddings off, as in the GaLore configs)."""
    if preset not in PRESETS:
        raise ModelError(f"unknown model preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    fields = {**PRESETS[preset], **overrides}
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **fields,
    )


def build_llama(preset: str, vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM of a named size, reproducible from `seed`."""
    import torch

    config = llama_config(preset, vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model
