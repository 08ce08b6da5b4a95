"""ZO-SGD with momentum (ZO-SGD-MMT in Zhang et al. 2024, "Revisiting Zeroth-Order Optimization for
Memory-Efficient LLM Fine-Tuning: A Benchmark").

m ← μ·m + ĝ; θ ← θ − lr · m. One momentum buffer per trainable parameter (as big as the parameter).
"""

from __future__ import annotations

import torch
from pydantic import Field

from memfit.techniques.base import Context
from memfit.zo.spsa import ZOOptimizer, trainable_named
from memfit.zo.technique import ZOConfig, ZOStepTechnique


class ZOMomentumSGD(ZOOptimizer):
    state_names = ("momentum_buffer",)

    def __init__(self, params, momentum: float = 0.9, **kwargs) -> None:
        super().__init__(params, momentum=momentum, **kwargs)

    def _update_chunk(self, param: torch.Tensor, est: torch.Tensor, state: dict, group: dict) -> None:
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(est)
        self._decay_(param, group)
        param.add_(buf, alpha=-group["lr"])


class ZOMomentumConfig(ZOConfig):
    momentum: float = Field(0.9, ge=0, lt=1)


class ZOMomentumStep(ZOStepTechnique):
    name = "zo-momentum"
    Config = ZOMomentumConfig
    state_per_param = 1

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        return ZOMomentumSGD([p for _, p in trainable_named(ctx.model)], momentum=self.config.momentum,
                             **self._common(ctx))
