"""SGD (Robbins & Monro 1951, "A Stochastic Approximation Method"; heavy-ball momentum: Polyak 1964; Nesterov
momentum as in Sutskever et al. 2013) — the state-free baseline the memory-saving papers compare against.

`torch.optim.SGD` itself (foreach off, so no hidden multi-tensor temporaries). Its only state is one momentum buffer
per trainable parameter, in the parameter's dtype, created at the first step when `momentum > 0`; with
`momentum: 0` the optimizer holds nothing. Weight decay is torch's coupled L2 term (`g += wd * p`), applied to
≥2-D parameters only (memfit's grouping). `layerwise: true` runs it inside backward like any other optimizer.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim.common import MemfitOptimizerTechnique
from memfit.techniques.base import TechniqueConfig


class SGDConfig(TechniqueConfig):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    dampening: float = Field(0.0, ge=0, le=1)
    nesterov: bool = False
    layerwise: bool = False  # update each parameter inside backward (frees its gradient at once)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDConfig:
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        return self


class SGDTechnique(MemfitOptimizerTechnique):
    """`optimizer: {name: sgd, lr: 0.01, momentum: 0.9}`."""

    name = "sgd"
    plan_options = ({"momentum": 0.9},)
    Config = SGDConfig

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, dampening=c.dampening, nesterov=c.nesterov,
                               foreach=False)

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        return p.nbytes if self.config.momentum else 0  # one momentum buffer in the parameter's dtype
