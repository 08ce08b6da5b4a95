"""APOLLO and APOLLO-Mini (Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang, Lee 2024, "APOLLO: SGD-like Memory,
AdamW-level Performance").

Adam moments are kept for a random projection of each 2-D gradient (a seeded Gaussian matrix with N(0, 1/r)
entries, refreshed every T steps — no SVD — and regenerated from its seed each step instead of stored). They are
only used to estimate how much Adam would rescale the gradient: channel-wise (APOLLO: one factor per row or
column, the ratio of norms of the projected Adam direction and the projected gradient) or tensor-wise
(APOLLO-Mini: rank 1, one factor per matrix). The raw full-rank gradient is multiplied by that factor and by
sqrt(alpha), then clipped by Fira's norm-growth limiter (the update norm may grow by at most `norm_growth_limit`
per step). Conventions follow the authors' reference package `apollo-torch`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from memfit.errors import ConfigError
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim.base import OptimizerConfig
from memfit.optim.common import MemfitOptimizerTechnique, check_choice, gaussian_basis
from memfit.optim.galore import GaLoreAdamW, galore_param_state_bytes

SCALE_TYPES = ("channel", "tensor")


class APOLLOAdamW(GaLoreAdamW):
    """APOLLO on the 2-D parameters of groups with `project=True`; AdamW on the rest.

    Args beyond AdamW: `rank`, `update_proj_gap` T, `scale` alpha, `scale_type` (channel | tensor),
    `norm_growth_limit` (None turns the limiter off), `seed` (the random projections).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 256, update_proj_gap: int = 200, scale: float = 1.0,
                 scale_type: str = "channel", norm_growth_limit: float | None = 1.01, proj_type: str = "std",
                 seed: int = 0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, seed=seed,
                         align_signs=False, scale_type=scale_type, norm_growth_limit=norm_growth_limit)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_choice(group["scale_type"], SCALE_TYPES, "scale_type")
        limit = group["norm_growth_limit"]
        if limit is not None and limit <= 1.0:
            raise ConfigError(f"optimizer 'norm_growth_limit' must be > 1 (or null to disable), got {limit!r}")

    def _new_basis(self, grad: torch.Tensor, group: dict, side: str, seed: int) -> torch.Tensor:
        return gaussian_basis(tuple(grad.shape), group["rank"], side, seed, grad.device, grad.dtype)

    def _basis(self, grad: torch.Tensor, group: dict, state: dict, side: str, seed: int,
               step: int) -> torch.Tensor:
        """The random projector is never stored: the state keeps its seed (a Python int) and every step redraws
        the same matrix, trading an r-by-n Gaussian draw per step for r*n fewer state values per matrix than
        GaLore (and than apollo-torch, which stores it)."""
        if "projection_seed" not in state or step % group["update_proj_gap"] == 0:
            state["projection_seed"] = seed + step
            with self.refresh_timer:
                return self._new_basis(grad, group, side, seed + step)
        return gaussian_basis(tuple(grad.shape), group["rank"], side, state["projection_seed"], grad.device,
                              grad.dtype)

    def _full_update(self, grad, low, direction, basis, side, state, group) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        step = state["step"]
        correction = math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        if group["scale_type"] == "channel":
            dim = 1 if side == "right" else 0  # norm over the projected (rank) dimension
            factor = direction.norm(dim=dim) / correction / (low.norm(dim=dim) + 1e-8)
            factor = factor.unsqueeze(1) if dim == 1 else factor
        else:
            factor = direction.norm() / correction / (low.norm() + 1e-8)
        update = grad * factor
        limit = group["norm_growth_limit"]
        if limit is not None:
            norm = update.norm()
            if "update_norm" in state:
                limiter = torch.clamp(norm / (state["update_norm"] + 1e-8), min=limit) / limit
                update = update / limiter
                state["update_norm"] = norm / limiter
            else:
                state["update_norm"] = norm
        return update.mul_(math.sqrt(group["scale"]) * correction)


class APOLLOConfig(OptimizerConfig):
    eps: float = Field(1e-6, gt=0)
    rank: int = Field(256, gt=0)
    update_proj_gap: int = Field(200, gt=0)
    scale: float = Field(1.0, gt=0)
    scale_type: Literal["channel", "tensor"] = "channel"
    norm_growth_limit: float | None = Field(1.01, gt=1.0)
    proj_type: Literal["std", "reverse_std", "left", "right"] = "std"
    seed: int = 0


class APOLLOMiniConfig(APOLLOConfig):
    rank: int = Field(1, gt=0)
    scale: float = Field(128.0, gt=0)
    scale_type: Literal["channel", "tensor"] = "tensor"


class APOLLOTechnique(MemfitOptimizerTechnique):
    """`optimizer: {name: apollo, rank: 256, scale: 1, update_proj_gap: 200}` (channel-wise scaling)."""

    name = "apollo"
    Config = APOLLOConfig
    full_weights_only = True  # projects whole weight matrices

    @classmethod
    def plan_variants(cls, spec: RunSpec, pretrained: bool = False) -> list[dict[str, Any]]:
        """Rank hidden/4, as GaLore (APOLLO-Mini keeps its rank 1)."""
        return [{"name": cls.name, **({} if cls.Config(name=cls.name).rank == 1 else {"rank": max(4, spec.model.hidden // 4)})}]

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        c = self.config
        kwargs: dict[str, Any] = dict(lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay, rank=c.rank,
                                      update_proj_gap=c.update_proj_gap, scale=c.scale, scale_type=c.scale_type,
                                      norm_growth_limit=c.norm_growth_limit, proj_type=c.proj_type, seed=c.seed)
        return APOLLOAdamW(groups, **kwargs)

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        c = self.config
        state = galore_param_state_bytes(p, target, c.rank, c.proj_type, stores_basis=False)
        if target and c.norm_growth_limit is not None:
            state += int(p.bytes_per_element)  # the 0-d norm of the last update (limiter)
        return state


class APOLLOMiniTechnique(APOLLOTechnique):
    """`optimizer: {name: apollo_mini}`: rank 1, tensor-wise scaling, alpha = 128."""

    name = "apollo_mini"
    Config = APOLLOMiniConfig
