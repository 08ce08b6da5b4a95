"""FRUGAL (Zmushko, Beznosikov, Takáč, Horváth 2024, "FRUGAL: Memory-Efficient Optimization by Reducing State
Overhead for Scalable Training").

The gradient of each targeted 2-D parameter is split into a rank-r subspace part P P^T G, updated by state-full
Adam (moments kept in the subspace, as in GaLore), and the residual G - P P^T G, updated by state-free signSGD — so
every step is full-rank while state stays low-rank. The subspace is refreshed every T steps from an exact SVD or a
random orthonormal basis; moments are reset on refresh (the paper's default strategy). Other parameters get AdamW.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from memfit.errors import ConfigError
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim.base import OptimizerConfig
from memfit.optim.common import (
    MemfitOptimizerTechnique,
    check_choice,
    gaussian_basis,
    project_back,
    svd_basis,
)
from memfit.optim.galore import GaLoreAdamW, galore_param_state_bytes

SUBSPACES = ("svd", "random")


class FRUGALAdamW(GaLoreAdamW):
    """Adam on a rank-r subspace + signSGD on the rest (`subspace`: svd | random; `free_lr_ratio`: the
    state-free learning rate relative to `lr`)."""

    def __init__(self, params, subspace: str = "svd", free_lr_ratio: float = 1.0, reset_on_refresh: bool = True,
                 **galore: Any) -> None:
        galore.setdefault("scale", 1.0)
        super().__init__(params, subspace=subspace, free_lr_ratio=free_lr_ratio,
                         reset_on_refresh=reset_on_refresh, **galore)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_choice(group["subspace"], SUBSPACES, "subspace")
        if group["free_lr_ratio"] < 0:
            raise ConfigError(f"optimizer 'free_lr_ratio' must be >= 0, got {group['free_lr_ratio']!r}")

    def _new_basis(self, grad: torch.Tensor, group: dict, side: str, seed: int) -> torch.Tensor:
        if group["subspace"] == "svd":
            return svd_basis(grad, group["rank"], side, "exact")
        gauss = gaussian_basis(tuple(grad.shape), group["rank"], side, seed, grad.device, torch.float32)
        q, _ = torch.linalg.qr(gauss.t() if side == "right" else gauss)  # orthonormal columns
        return (q.t() if side == "right" else q).to(grad.dtype).contiguous()

    def _on_refresh(self, state: dict, group: dict) -> None:
        if group["reset_on_refresh"]:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].zero_()

    def _full_update(self, grad, low, direction, basis, side, state, group) -> torch.Tensor:
        residual = grad - project_back(low, basis, side)
        update = project_back(direction, basis, side).mul_(group["scale"])
        return update.add_(residual.sign_(), alpha=group["free_lr_ratio"])


class FRUGALConfig(OptimizerConfig):
    rank: int = Field(128, gt=0)
    update_proj_gap: int = Field(200, gt=0)
    subspace: Literal["svd", "random"] = "svd"
    proj_type: Literal["std", "reverse_std", "left", "right"] = "std"
    free_lr_ratio: float = Field(1.0, ge=0)
    reset_on_refresh: bool = True
    seed: int = 0


class FRUGALTechnique(MemfitOptimizerTechnique):
    """`optimizer: {name: frugal, rank: 128, update_proj_gap: 200, subspace: svd|random}`."""

    name = "frugal"
    Config = FRUGALConfig

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        c = self.config
        return FRUGALAdamW(groups, subspace=c.subspace, free_lr_ratio=c.free_lr_ratio,
                           reset_on_refresh=c.reset_on_refresh, lr=c.lr, betas=c.betas, eps=c.eps,
                           weight_decay=c.weight_decay, rank=c.rank, update_proj_gap=c.update_proj_gap,
                           proj_type=c.proj_type, seed=c.seed)

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        return galore_param_state_bytes(p, target, self.config.rank, self.config.proj_type)



