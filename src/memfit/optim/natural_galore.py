"""Natural GaLore (Das 2024, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and
Fine-tuning").

GaLore whose projected gradient is first preconditioned by the inverse of an empirical Fisher built from the last
s projected gradients, F = lambda*I + (1/s) * sum_i g_i g_i^T, before entering Adam. F^-1 g is computed with the
Woodbury identity, F^-1 g = (g - G (s*lambda*I + G^T G)^-1 G^T g) / lambda with G = [g_1 .. g_s] (k x s), so only an
s x s system is solved. lambda = damping * mean(G**2) (relative to the gradients' scale). The history is cleared
when the projector is refreshed (old entries live in another subspace).

State per projected parameter: GaLore's (projector + low-rank moments) plus the s low-rank gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from memfit.errors import ConfigError
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim.common import (
    check_positive_int,
    moments_direction,
    projected_shape,
    projection_side,
)
from memfit.optim.galore import (
    GaLoreAdamW,
    GaLoreConfig,
    GaLoreTechnique,
    galore_param_state_bytes,
)


def woodbury_natural_gradient(g: torch.Tensor, history: torch.Tensor, damping: float) -> torch.Tensor:
    """(lambda*I + H^T H / s)^-1 g for `history` H (s x k) and flat `g` (k), lambda = damping * mean(H**2)."""
    s, k = history.shape
    gram = history @ history.t()
    lam = damping * float(gram.diagonal().sum()) / (s * k) + torch.finfo(g.dtype).tiny
    system = gram + s * lam * torch.eye(s, dtype=g.dtype, device=g.device)
    coeff = torch.linalg.solve(system, history @ g)
    return (g - history.t() @ coeff) / lam


class NaturalGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW with the projected gradient preconditioned by the inverse empirical Fisher (`history` s,
    `damping`)."""

    def __init__(self, params, history: int = 10, damping: float = 1.0, **galore: Any) -> None:
        super().__init__(params, history=history, damping=damping, **galore)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_positive_int(group["history"], "history")
        if group["damping"] <= 0:
            raise ConfigError(f"optimizer 'damping' must be > 0, got {group['damping']!r}")

    def _on_refresh(self, state: dict, group: dict) -> None:
        state["fisher_count"] = 0

    def _low_rank_direction(self, low: torch.Tensor, state: dict, group: dict, step: int) -> torch.Tensor:
        s = group["history"]
        if "fisher_history" not in state:
            state["fisher_history"] = low.new_zeros(s, low.numel())
        count = state.get("fisher_count", 0)
        state["fisher_history"][count % s] = low.reshape(-1)
        state["fisher_count"] = count + 1
        used = state["fisher_history"][: min(count + 1, s)]
        natural = woodbury_natural_gradient(low.reshape(-1).float(), used.float(), group["damping"])
        return moments_direction(state, natural.view_as(low).to(low.dtype), group, step, group["quantize"],
                                 group["block_size"])


class NaturalGaLoreConfig(GaLoreConfig):
    history: int = Field(10, gt=0)
    damping: float = Field(1.0, gt=0)


class NaturalGaLoreTechnique(GaLoreTechnique):
    """`optimizer: {name: natural_galore, rank: 128, history: 10, damping: 1.0, ...}`."""

    name = "natural_galore"
    Config = NaturalGaLoreConfig

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        c = self.config
        return NaturalGaLoreAdamW(groups, history=c.history, damping=c.damping, **self._kwargs())

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        c = self.config
        state = galore_param_state_bytes(p, target, c.rank, c.proj_type)
        if target:
            m, n = projected_shape(p.shape, c.rank, projection_side(p.shape, c.proj_type))
            state += int(c.history * m * n * p.bytes_per_element)
        return state
