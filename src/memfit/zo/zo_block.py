"""Block-wise ZO-SGD (Zhang et al. 2024, "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM
Fine-Tuning: A Benchmark", §5: perturbing one block — here one transformer layer — at a time lowers the variance of
the SPSA estimate, at 2 forward passes per block).

Each parameter group is a block; a step estimates and updates `blocks_per_step` blocks in turn (all by default),
cycling through the model over steps. No optimizer state.
"""

from __future__ import annotations

import torch
from pydantic import Field

from memfit.techniques.base import Context
from memfit.zo.spsa import ZOOptimizer, block_groups
from memfit.zo.technique import ZOConfig, ZOStepTechnique


class ZOBlockSGD(ZOOptimizer):
    """ZO-SGD with one SPSA estimate per parameter group (block) per step."""

    def __init__(self, params, blocks_per_step: int | None = None, **kwargs) -> None:
        super().__init__(params, blocks_per_step=blocks_per_step, block_cursor=0, **kwargs)

    def _blocks(self) -> list[list[dict]]:
        groups = self.param_groups
        head = groups[0]
        k = head["blocks_per_step"] or len(groups)
        start = head["block_cursor"]
        chosen = [groups[(start + i) % len(groups)] for i in range(min(k, len(groups)))]
        head["block_cursor"] = (start + len(chosen)) % len(groups)
        return [[g] for g in chosen]

    def _update_chunk(self, param: torch.Tensor, est: torch.Tensor, state: dict, group: dict) -> None:
        self._decay_(param, group)
        param.add_(est, alpha=-group["lr"])


class ZOBlockConfig(ZOConfig):
    blocks_per_step: int | None = Field(None, ge=1, description="blocks updated per step (default: all)")


class ZOBlockStep(ZOStepTechnique):
    name = "zo-block"
    Config = ZOBlockConfig

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        return ZOBlockSGD(block_groups(ctx.model), blocks_per_step=self.config.blocks_per_step,
                          **self._common(ctx))
