"""ZO-SGD-Sign (ZO-signSGD, Liu et al. 2019; benchmarked for LLM fine-tuning by Zhang et al. 2024, "Revisiting
Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark").

θ ← θ − lr · sign(ĝ): only the sign of the SPSA estimate is used, which bounds each step and is robust to the
estimate's heavy-tailed scale. No optimizer state.
"""

from __future__ import annotations

import torch

from memfit.techniques.base import Context
from memfit.zo.spsa import ZOOptimizer, trainable_named
from memfit.zo.technique import ZOStepTechnique


class ZOSignSGD(ZOOptimizer):
    def _update_chunk(self, param: torch.Tensor, est: torch.Tensor, state: dict, group: dict) -> None:
        self._decay_(param, group)
        param.add_(est.sign_(), alpha=-group["lr"])


class ZOSignStep(ZOStepTechnique):
    name = "zo-sign"

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        return ZOSignSGD([p for _, p in trainable_named(ctx.model)], **self._common(ctx))
