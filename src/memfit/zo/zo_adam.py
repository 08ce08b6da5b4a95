"""ZO-Adam (Chen et al. 2019, "ZO-AdaMM"; benchmarked for LLM fine-tuning by Zhang et al. 2024, "Revisiting
Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark").

Adam moments of the SPSA estimate, decoupled weight decay: two state tensors per trainable parameter.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from memfit.techniques.base import Context
from memfit.zo.spsa import ZOOptimizer, trainable_named
from memfit.zo.technique import ZOConfig, ZOStepTechnique


class ZOAdam(ZOOptimizer):
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, **kwargs) -> None:
        super().__init__(params, betas=tuple(betas), adam_eps=adam_eps, adam_step=0, **kwargs)

    def _apply_update(self, groups, seeds, projected) -> None:
        for g in groups:
            g["adam_step"] += 1
        super()._apply_update(groups, seeds, projected)

    def _update_chunk(self, param: torch.Tensor, est: torch.Tensor, state: dict, group: dict) -> None:
        b1, b2 = group["betas"]
        t = group["adam_step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(est, 1 - b1)
        v.mul_(b2).addcmul_(est, est, value=1 - b2)
        denom = est.copy_(v).sqrt_().div_(math.sqrt(1 - b2**t)).add_(group["adam_eps"])  # reuse est's memory
        self._decay_(param, group)
        param.addcdiv_(m, denom, value=-group["lr"] / (1 - b1**t))


class ZOAdamConfig(ZOConfig):
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)


class ZOAdamStep(ZOStepTechnique):
    name = "zo-adam"
    Config = ZOAdamConfig
    state_per_param = 2

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        c = self.config
        return ZOAdam([p for _, p in trainable_named(ctx.model)], betas=c.betas, adam_eps=c.adam_eps,
                      **self._common(ctx))
