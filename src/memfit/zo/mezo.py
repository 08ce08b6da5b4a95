"""MeZO / ZO-SGD (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes").

θ ← θ − lr · (ĝ + λθ) with ĝ the in-place n-SPSA estimate (`memfit.zo.spsa`): no gradients, no optimizer state,
the memory of inference.
"""

from __future__ import annotations

import torch

from memfit.techniques.base import Context
from memfit.zo.spsa import ZOOptimizer, trainable_named
from memfit.zo.technique import ZOStepTechnique


class ZOSGD(ZOOptimizer):
    """MeZO's ZO-SGD. `step(closure)`; closure returns the objective, no backward."""

    def _update_chunk(self, param: torch.Tensor, est: torch.Tensor, state: dict, group: dict) -> None:
        self._decay_(param, group)
        param.add_(est, alpha=-group["lr"])


class MeZOStep(ZOStepTechnique):
    name = "mezo"
    plan_options = ({},)
    conflicts = ("activations",)  # no backward: nothing saved for it to change

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        return ZOSGD([p for _, p in trainable_named(ctx.model)], **self._common(ctx))
