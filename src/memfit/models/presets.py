"""Llama-architecture size presets for from-scratch training.

`llama-60m` / `llama-130m` / `llama-350m` follow the configs used by GaLore (Zhao et al. 2024) and APOLLO
(Zhu et al. 2024) for C4 pre-training; the smaller ones are for laptops and tests. `vocab_size` is set from
the tokenizer at build time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


from memfit.errors import ModelError

if TYPE_CHECKING:  # transformers loads on first use: even its config classes import its modeling stack (seconds)
    from transformers import LlamaConfig, LlamaForCausalLM

_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
PRESETS: dict[str, dict[str, int]] = {name: dict(zip(_SHAPE, shape)) for name, shape in {
    # name:       hidden, intermediate, layers, heads, kv_heads
    "llama-tiny": (64, 176, 2, 4, 2),
    "llama-1m": (128, 352, 4, 4, 4),
    "llama-20m": (384, 1024, 6, 6, 6),
    "llama-60m": (512, 1376, 8, 8, 8),
    "llama-130m": (768, 2048, 12, 12, 12),
    "llama-350m": (1024, 2736, 24, 16, 16),
}.items()}


def llama_config(preset: str, vocab_size: int, max_position_embeddings: int = 2048, **overrides) -> LlamaConfig:
    """The `LlamaConfig` of a named preset (tied embeddings off, as in the GaLore configs)."""
    from transformers import LlamaConfig

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
    from transformers import LlamaForCausalLM

    config = llama_config(preset, vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model
