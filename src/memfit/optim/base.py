"""Shared pieces of the optimizer slot: the common config and parameter grouping."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from memfit.memory.spec import ParamInfo
from memfit.techniques.base import TechniqueConfig


class OptimizerConfig(TechniqueConfig):
    """Options every optimizer technique accepts."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    layerwise: bool = False  # update each parameter inside backward (frees its gradient at once)
    offload: Literal["none", "disk"] = "none"  # disk: state in memory-mapped files, stepped unit by unit (optim/offload.py)


def is_no_decay(name: str, shape: tuple[int, ...]) -> bool:
    """Biases and norm weights (1-D) are not weight-decayed (the usual LLM training convention)."""
    return len(shape) < 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (≥2-D) and non-decayed (1-D) groups, names kept."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if is_no_decay(name, tuple(p.shape)) else decay).append((name, p))
    groups = []
    for items, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if items:
            groups.append({"params": [p for _, p in items], "names": [n for n, _ in items], "weight_decay": wd})
    return groups


def trainable_params(params: Iterable[ParamInfo]) -> list[ParamInfo]:
    return [p for p in params if p.trainable]


def state_dtype_bytes(p: ParamInfo) -> float:
    """Moments live in the parameter's dtype (as in `torch.optim.AdamW`)."""
    return p.bytes_per_element


STEP_COUNTER_BYTES = 4
"""`torch.optim` keeps a 0-d float32 `step` tensor per parameter (non-capturable, non-fused)."""


def check_has_trainable(model: nn.Module) -> None:
    from memfit.errors import ConfigError

    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters; check the adapter settings")


def named_trainable(model: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
