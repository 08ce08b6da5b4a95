"""Reading a family's facts off a transformers config and (meta-device) modules."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from memfit.memory.arch.base import Saves, UnsupportedArchitecture
from memfit.memory.arch.probe import probe


def first(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` the config sets (configs name the same fact differently: `n_inner`, `ffn_dim`...)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def has(module: nn.Module | None, *names: str) -> bool:
    return module is not None and all(hasattr(module, n) for n in names)


def children(module: nn.Module) -> set[str]:
    """Names of a block's child modules, dropouts aside (`dropout_children` reads those)."""
    return {n for n, c in module.named_children() if not isinstance(c, nn.Dropout)}


def only(module: nn.Module | None, *allowed: str) -> bool:
    """Whether a module's children (dropouts aside) are all among `allowed`: a family claims a block only when it
    knows every part of it, so a variant with more (StableLM's per-head norms, say) is refused, not guessed."""
    return module is not None and children(module) <= set(allowed)


def dropout_children(module: nn.Module) -> float:
    """The largest probability of a block's own dropout modules (0 without any)."""
    return max((c.p for c in module.children() if isinstance(c, nn.Dropout)), default=0.0)


def out_features(module: nn.Module) -> int:
    """Output width of a projection: `nn.Linear`, GPT-2's `Conv1D` (weight stored (in, out)), or a wrapper."""
    if hasattr(module, "nf"):  # transformers' Conv1D
        return int(module.nf)
    if hasattr(module, "out_features"):
        return int(module.out_features)
    return int(module.weight.shape[0])


def activation(module: nn.Module | None, config: Any, *names: str) -> Saves:
    """What the MLP's activation saves: probed from its module, else from the config's activation name."""
    if module is None:
        from transformers.activations import ACT2FN

        name = first(config, *names)
        if name not in ACT2FN:
            raise UnsupportedArchitecture(f"activation '{name}' of model_type '{config.model_type}' is unknown to "
                                          f"transformers' ACT2FN; memfit cannot tell what it saves")
        module = ACT2FN[name]
    return probe(module, backward=True)


def dense_gated(mlp: nn.Module) -> bool:
    """A Llama-style gated MLP: down(act(gate(x)) · up(x)), gate and up separate or fused."""
    return has(mlp, "down_proj") and (has(mlp, "gate_proj", "up_proj") or has(mlp, "gate_up_proj"))


def sliding_layers(config: Any, n_layers: int) -> int:
    """How many layers attend within a sliding window: `layer_types` when the config lists them (Gemma2, Qwen2),
    else every layer when a window is set and not switched off (Mistral)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return 0
    types = getattr(config, "layer_types", None)
    if types:
        return sum(t == "sliding_attention" for t in types)
    return n_layers if getattr(config, "use_sliding_window", True) else 0


def dropout(config: Any, *names: str) -> float:
    return float(first(config, *names, default=0.0) or 0.0)


def rotary_dim(model: nn.Module) -> int:
    """Channels per head the rotary embedding rotates: twice its `inv_freq` length (0 without one). Read off the
    module, so partial rotary (`rotary_pct`, `partial_rotary_factor`, wherever the config keeps it) is covered."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return 2 * inv_freq.shape[-1]
    return 0


def rotary_relays_output(attention: nn.Module, head_dim: int, rotary: int) -> bool:
    """Whether the attention output is copied into a new tensor for the output projection under SDPA.

    SDPA's output follows q's memory layout: q projected as (B, S, H, D) and rotated elementwise keeps that layout,
    so transposing back is free; a rotary that concatenates the rotated and passed-through channels (written for
    partial rotary) returns q head-major, and `transpose(1, 2).contiguous()` then copies. Probed by calling the
    model's own `apply_rotary_pos_emb` on a tiny q; a model without one is assumed to copy (the larger estimate).
    """
    fn = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
    if fn is None or not rotary:
        return True
    q = torch.randn(1, 3, 2, head_dim).transpose(1, 2)  # (B, H, S, D) view of a (B, S, H, D) projection
    cos = sin = torch.randn(1, 3, rotary)
    try:
        out = fn(q, q.clone(), cos, sin)[0]
    except (TypeError, RuntimeError):
        return True
    return not out.transpose(1, 2).is_contiguous()


def dims(config: Any, intermediate: int, kv_heads: int | None = None, head_dim: int | None = None) -> dict:
    """The `ModelShape` numbers (layers aside): hidden size, heads, k/v heads (default: as many as q heads), head
    width (default: hidden / heads), the MLP's width (read off its module by the caller) and the vocabulary."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    return dict(hidden=hidden, n_heads=heads, n_kv_heads=kv_heads or heads, head_dim=head_dim or hidden // heads,
                intermediate=intermediate, vocab=config.vocab_size)
