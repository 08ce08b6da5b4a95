"""AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization") — the baseline every method is
measured against: two moments per trainable parameter, i.e. 8 bytes of state per fp32 parameter."""

from __future__ import annotations

import torch

from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec
from memfit.optim.base import (
    STEP_COUNTER_BYTES,
    OptimizerConfig,
    check_has_trainable,
    param_groups,
    state_dtype_bytes,
    trainable_params,
)
from memfit.techniques.base import Context, OptimizerTechnique


class AdamWConfig(OptimizerConfig):
    pass


class AdamWTechnique(OptimizerTechnique):
    """`torch.optim.AdamW` (foreach off, so no hidden multi-tensor temporaries)."""

    name = "adamw"
    plan_options = ({}, {"layerwise": True})
    Config = AdamWConfig

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        check_has_trainable(ctx.model)
        c = self.config
        return torch.optim.AdamW(
            param_groups(ctx.model, c.weight_decay), lr=c.lr, betas=c.betas, eps=c.eps, foreach=False
        )

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        params = trainable_params(spec.model.params)
        state = sum(int(2 * p.numel * state_dtype_bytes(p)) + STEP_COUNTER_BYTES for p in params)
        if self.config.layerwise:
            from memfit.optim.common import layerwise_gradient_bytes

            return base.with_(optimizer=state, gradients=layerwise_gradient_bytes(spec))
        return base.with_(optimizer=state)
