"""GaLore (Zhao, Zhang, Chen, Wang, Anandkumar, Tian 2024, "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection"), with its 8-bit variant (moments block-wise quantized as in Dettmers et al. 2022).

Each targeted 2-D gradient G (m x n) is projected onto a rank-r subspace, Adam moments live in that subspace,
and the Adam direction is projected back and scaled by alpha. The projector is refreshed every T steps from the
current gradient — exact SVD (`torch.linalg.svd`) or randomized SVD (`torch.svd_lowrank`, much cheaper on large
matrices). Other parameters (norms, biases, embeddings, heads) get AdamW inside the same optimizer.

Optimizer state per projected (m >= n) parameter: projector r*n + moments 2*m*r (instead of AdamW's 2*m*n).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from memfit.errors import ConfigError
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim import quant
from memfit.optim.base import OptimizerConfig
from memfit.optim.common import (
    PROJ_TYPES,
    SVD_METHODS,
    MemfitOptimizer,
    MemfitOptimizerTechnique,
    Timer,
    adamw_fallback_step,
    align_signs,
    apply_update,
    basis_shape,
    check_choice,
    check_positive_int,
    check_rank,
    group_names,
    moments_bytes,
    moments_direction,
    param_seed,
    project,
    project_back,
    projected_shape,
    projection_side,
    svd_basis,
)


class GaLoreAdamW(MemfitOptimizer):
    """AdamW with GaLore gradient projection on 2-D parameters of groups with `project=True` (the default).

    Args: rank r, `update_proj_gap` T (refresh the projector every T steps, first at step 0), `scale` alpha,
    `proj_type` (std | reverse_std | left | right), `svd` (exact | randomized), `quantize` (8-bit moments,
    block-wise, `block_size`; parameters smaller than `min_8bit_size` stay fp32), `seed` (randomized SVD),
    `align_signs` (flip new singular vectors to agree with the previous projector; galore-torch does not).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", svd: str = "exact", quantize: bool = False,
                 block_size: int = quant.DEFAULT_BLOCK, min_8bit_size: int = 4096, seed: int = 0,
                 align_signs: bool = True, **extra_defaults: Any) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd,
                        quantize=quantize, block_size=block_size, min_8bit_size=min_8bit_size, seed=seed,
                        align_signs=align_signs, project=True, **extra_defaults)
        super().__init__(params, defaults)
        self.refresh_timer = Timer()
        for group in self.param_groups:
            self._check_group(group)

    # --- hooks subclasses change ------------------------------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        check_positive_int(group["update_proj_gap"], "update_proj_gap")
        check_choice(group["proj_type"], PROJ_TYPES, "proj_type")
        check_choice(group["svd"], SVD_METHODS, "svd")
        check_positive_int(group["block_size"], "block_size")
        if group["scale"] <= 0:
            raise ConfigError(f"optimizer 'scale' must be > 0, got {group['scale']!r}")
        for p, name in zip(group["params"], group_names(group)):
            if self._projects(group, p):
                check_rank(group["rank"], tuple(p.shape), name or "?")

    def _projects(self, group: dict, p: torch.Tensor) -> bool:
        return bool(group.get("project", True)) and p.ndim == 2

    def _new_basis(self, grad: torch.Tensor, group: dict, side: str, seed: int) -> torch.Tensor:
        return svd_basis(grad, group["rank"], side, group["svd"], seed=seed)

    def _basis(self, grad: torch.Tensor, group: dict, state: dict, side: str, seed: int,
               step: int) -> torch.Tensor:
        """This step's projector: a new one every T steps (from step 0), kept in the state in between."""
        if "projection" not in state or step % group["update_proj_gap"] == 0:
            with self.refresh_timer:
                basis = self._new_basis(grad, group, side, seed + step)
                if group["align_signs"]:
                    basis = align_signs(basis, state.get("projection"), side)
                state["projection"] = basis
            self._on_refresh(state, group)
        return state["projection"]

    def _on_refresh(self, state: dict, group: dict) -> None:
        """Called after a new projector is chosen (moments are kept, as in GaLore)."""

    def _low_rank_direction(self, low: torch.Tensor, state: dict, group: dict, step: int) -> torch.Tensor:
        return moments_direction(state, low, group, step, group["quantize"], group["block_size"])

    def _full_update(self, grad: torch.Tensor, low: torch.Tensor, direction: torch.Tensor, basis: torch.Tensor,
                     side: str, state: dict, group: dict) -> torch.Tensor:
        return project_back(direction, basis, side).mul_(group["scale"])

    # --- the step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = self.closure_loss(closure)
        for group in self.param_groups:
            for index, (p, name) in enumerate(zip(group["params"], group_names(group))):
                if p.grad is None:
                    continue
                state = self.state[p]
                if self._projects(group, p):
                    self._projected_step(p, group, state, param_seed(group["seed"], name, index))
                else:
                    quantized = group["quantize"] and p.numel() >= group["min_8bit_size"]
                    adamw_fallback_step(p, p.grad, group, state, quantized, group["block_size"])
        return loss

    def _projected_step(self, p: torch.Tensor, group: dict, state: dict, seed: int) -> None:
        grad = p.grad
        step = state.get("step", 0)
        side = projection_side(tuple(p.shape), group["proj_type"])
        basis = self._basis(grad, group, state, side, seed, step)
        low = project(grad, basis, side)
        state["step"] = step + 1
        direction = self._low_rank_direction(low, state, group, step + 1)
        apply_update(p, self._full_update(grad, low, direction, basis, side, state, group), group)


class GaLoreConfig(OptimizerConfig):
    eps: float = Field(1e-6, gt=0)
    rank: int = Field(128, gt=0)
    update_proj_gap: int = Field(200, gt=0)
    scale: float = Field(0.25, gt=0)
    proj_type: Literal["std", "reverse_std", "left", "right"] = "std"
    svd: Literal["exact", "randomized"] = "exact"
    seed: int = 0
    align_signs: bool = True


class GaLore8bitConfig(GaLoreConfig):
    block_size: int = Field(quant.DEFAULT_BLOCK, gt=0)
    min_8bit_size: int = Field(4096, ge=0)


def galore_param_state_bytes(p: ParamInfo, target: bool, rank: int, proj_type: str, quantized: bool = False,
                             block_size: int = quant.DEFAULT_BLOCK, min_8bit_size: int = 4096,
                             stores_basis: bool = True) -> int:
    """State bytes GaLoreAdamW keeps for one parameter (projector + moments, or AdamW moments)."""
    if target:
        side = projection_side(p.shape, proj_type)
        b = basis_shape(p.shape, rank, side)
        low = projected_shape(p.shape, rank, side)
        return int(b[0] * b[1] * p.bytes_per_element * stores_basis) + moments_bytes(
            low[0] * low[1], p.bytes_per_element, quantized, block_size)
    return moments_bytes(p.numel, p.bytes_per_element, quantized and p.numel >= min_8bit_size, block_size)


class GaLoreTechnique(MemfitOptimizerTechnique):
    """`optimizer: {name: galore, rank: 128, update_proj_gap: 200, scale: 0.25, svd: exact|randomized}`."""

    name = "galore"
    Config = GaLoreConfig
    quantized = False
    full_weights_only = True  # projects whole weight matrices

    FINE_TUNE_SCALE: ClassVar[float] = 4.0
    """Update scale when fine-tuning pretrained weights (the pre-training default 0.25 barely moves them: on CoNLL
    with MiniLM, GaLore at scale 1 reached 0 entity F1 after 60 steps, at scale 4 0.32, AdamW 0.46)."""

    @classmethod
    def plan_variants(cls, spec: RunSpec, pretrained: bool = False) -> list[dict[str, Any]]:
        """Rank hidden/4 (the GaLore/APOLLO papers' ratio on small models), with and without layer-wise updates."""
        base = {"name": cls.name, "rank": max(4, spec.model.hidden // 4),
                **({"scale": cls.FINE_TUNE_SCALE} if pretrained else {})}
        return [base, {**base, "layerwise": True}]

    def _kwargs(self) -> dict[str, Any]:
        c = self.config
        kwargs = dict(lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay, rank=c.rank,
                      update_proj_gap=c.update_proj_gap, scale=c.scale, proj_type=c.proj_type, svd=c.svd,
                      seed=c.seed, align_signs=c.align_signs, quantize=self.quantized)
        if self.quantized:
            kwargs.update(block_size=c.block_size, min_8bit_size=c.min_8bit_size)
        return kwargs

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        return GaLoreAdamW(groups, **self._kwargs())

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        c = self.config
        if self.quantized:
            return galore_param_state_bytes(p, target, c.rank, c.proj_type, True, c.block_size, c.min_8bit_size)
        return galore_param_state_bytes(p, target, c.rank, c.proj_type)


class GaLore8bitTechnique(GaLoreTechnique):
    """`optimizer: {name: galore_8bit, ...}`: GaLore with block-wise 8-bit moments (fallback AdamW too)."""

    name = "galore_8bit"
    Config = GaLore8bitConfig
    quantized = True
