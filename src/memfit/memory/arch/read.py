"""Reading a family's facts off a transformers config and (meta-device) modules."""

from __future__ import annotations

from typing import Any

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
    return {n for n, _ in module.named_children()}


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
    return probe(module)


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
