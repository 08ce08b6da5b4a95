"""SCALE (Glentis, Li, Han, Hong 2025, "A Minimalist Optimizer Design for LLM Pretraining").

Stochastic Column-normAlized Last-layer momEntum: every 2-D weight is updated by SGD with its gradient normalized
column by column along the output dimension (each column divided by its L2 norm), and only the output layer keeps a
first-order momentum (where gradient variance is highest). No second moments anywhere. In torch's (out, in) layout
a column is `W[:, j]` (norm over dim 0); an embedding table (tokens, hidden) outputs along dim 1, so each token's
row is normalized. Non-2-D parameters (norms, biases) fall back to AdamW inside the same optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field
from torch import nn

from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim.base import OptimizerConfig, is_no_decay
from memfit.optim.common import (
    MemfitOptimizer,
    MemfitOptimizerTechnique,
    adamw_fallback_step,
    apply_update,
)

LAST_LAYER = ("lm_head", "classifier", "score")
EMBEDDING = ("embed", "wte", "wpe")


class SCALE(MemfitOptimizer):
    """Column-normalized SGD on 2-D params of groups with `project=True`; momentum `beta` where `momentum=True`;
    `norm_dim` per group (0: columns of an (out, in) weight); AdamW (`betas`, `eps`) on everything else."""

    def __init__(self, params: Iterable, lr: float = 1e-3, beta: float = 0.9, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, beta=beta, betas=betas, eps=eps, weight_decay=weight_decay,
                                      project=True, momentum=False, norm_dim=0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not (group["project"] and p.ndim == 2):
                    adamw_fallback_step(p, p.grad, group, state)
                    continue
                direction = p.grad
                if group["momentum"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    direction = state["momentum_buffer"].lerp_(p.grad, 1 - group["beta"])
                norms = direction.norm(dim=group["norm_dim"], keepdim=True).add_(group["eps"])
                apply_update(p, direction / norms, group)
        return loss


def scale_groups(model: nn.Module, weight_decay: float, last_layer: Iterable[str] = LAST_LAYER) -> list[dict]:
    """2-D params split into last layer (momentum), embeddings (row-normalized), other matrices; then 1-D."""
    last_layer = tuple(last_layer)
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {"last": [], "embed": [], "matrix": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim != 2:
            kind = "other"
        elif any(k in name for k in last_layer):
            kind = "last"
        elif any(k in name for k in EMBEDDING):
            kind = "embed"
        else:
            kind = "matrix"
        buckets[kind].append((name, p))
    options = {"last": dict(momentum=True), "embed": dict(norm_dim=1), "matrix": {}, "other": dict(project=False)}
    groups = []
    for kind, items in buckets.items():
        if items:
            wd = 0.0 if kind == "other" and all(is_no_decay(n, tuple(p.shape)) for n, p in items) else weight_decay
            groups.append({"params": [p for _, p in items], "names": [n for n, _ in items], "weight_decay": wd,
                           **options[kind]})
    return groups


class SCALEConfig(OptimizerConfig):
    momentum_beta: float = Field(0.9, ge=0, lt=1)
    last_layer: tuple[str, ...] = LAST_LAYER


class SCALETechnique(MemfitOptimizerTechnique):
    """`optimizer: {name: scale, lr: 1e-3, momentum_beta: 0.9}`."""

    name = "scale"
    Config = SCALEConfig
    exclude = ()

    def param_groups(self, model: nn.Module) -> list[dict]:
        return scale_groups(model, self.config.weight_decay, self.config.last_layer)

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        c = self.config
        return SCALE(groups, lr=c.lr, beta=c.momentum_beta, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        if len(p.shape) != 2:
            return int(2 * p.numel * p.bytes_per_element)
        if any(k in p.name for k in self.config.last_layer):
            return int(p.numel * p.bytes_per_element)
        return 0
