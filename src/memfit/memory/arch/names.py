"""Which parameters are which, by name and by the described architecture: embeddings, block members, MoE routers
(a leaf module: the families, `flow.py` and the techniques read it)."""

from __future__ import annotations

import re

_EMBEDDING_NAMES = ("embed", "embeddings", "wte", "wpe")
_LAYER_RE = re.compile(r"\.layers?\.\d+\.")


def is_embedding(shape: ModelShape, name: str) -> bool:
    """Whether parameter `name` is part of the input embeddings (a table gathered by index, or its container's
    norm): read off the modules when the model was described, else guessed from the name. Module paths are
    matched anywhere in the name, so the names an adapter wrapper gives (`base_model.model.…`) still match."""
    if shape.arch is not None:
        return any(f".{module}." in f".{name}" for module in shape.arch.embedding_modules)
    return any(k in name for k in _EMBEDDING_NAMES)


ROUTER_SUFFIXES = (".gate.weight", "_expert_gate.weight", ".router.weight", ".gate", "_expert_gate", ".router")


def is_router(name: str) -> bool:
    """A mixture-of-experts router's weight or module (Mixtral/Qwen-MoE/OLMoE `mlp.gate`, Qwen-MoE's
    `shared_expert_gate`): it scores experts rather than transforming the hidden state (not `gate_proj`)."""
    return name.endswith(ROUTER_SUFFIXES)


def in_block(shape: ModelShape, name: str) -> bool:
    """Whether parameter `name` belongs to one of the repeated blocks."""
    if shape.arch is not None and shape.arch.layer_prefix:
        return f".{shape.arch.layer_prefix}." in f".{name}"
    return bool(_LAYER_RE.search(f".{name}"))
