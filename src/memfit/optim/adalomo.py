"""AdaLomo (Lv, Yan, Guo, Liu, Qiu 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate"): LOMO with
an Adafactor-style adaptive step (Shazeer & Stern 2018) — still fused into backward, gradients freed at once.

Per parameter, in fp32: the second moment of the gradient is kept factored — a row and a column mean of
`g² + eps₁` for a matrix (m + n values instead of m·n), the full vector for a 1-D parameter — with the
decay `β₂ₜ = 1 - t^decay_rate`; the update `g / sqrt(v̂)` is divided by `max(1, RMS(update) / clip_threshold)`,
and the step size is relative to the parameter: `lr · max(eps₂, RMS(p))`. Weight decay is decoupled
(`p *= 1 - lr_t · wd`). Norm clipping and in-backward fusing are LOMO's (`memfit.optim.lomo`).

Conventions match the authors' package `lomo-optim` (0.1.1): same update order and eps placement, the step
counter starts at 1 for the first update. Differences: the package keeps one global step counter and state for every
parameter, memfit a step per trained parameter (equal when all train) and state only for trained ones; weight decay
skips 1-D parameters (memfit's grouping); the package's static loss scale (2¹⁰, undone before the update) is
not applied — in fp32 and bf16 a power-of-two scale changes no bits of the update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from pydantic import Field

from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim.lomo import FusedConfig, FusedRule, FusedTechnique, write_back

F32 = 4


def factored_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row and column statistics of a ≥2-D parameter: means over the last and the second-to-last dimension."""
    return shape[:-1], shape[:-2] + shape[-1:]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(x.numel())


class AdaLomo(FusedRule):
    """AdaLomo's update rule (wrap with `memfit.optim.lomo.fuse` to run it inside backward)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 clip_grad_value: float | None = None) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, eps=eps, clip_threshold=clip_threshold,
                                      decay_rate=decay_rate, clip_grad_value=clip_grad_value))

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        eps_sq, eps_scale = group["eps"]
        if "step" not in state:
            if p.dim() >= 2:
                rows, cols = factored_shapes(tuple(p.shape))
                state["exp_avg_sq_row"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
                state["exp_avg_sq_col"] = torch.zeros(cols, dtype=torch.float32, device=p.device)
            else:
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["step"] = 0
        state["step"] += 1
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        sq = grad.square().add_(eps_sq)
        if p.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
            del sq
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            del sq
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        p_fp32 = p.float()
        lr = group["lr"] * max(eps_scale, _rms(p_fp32))  # relative step: a 0-d tensor, as in the reference
        if group["weight_decay"] > 0:
            p_fp32.mul_(1.0 - lr * group["weight_decay"])
        p_fp32.add_(update, alpha=-lr)
        write_back(p, p_fp32)


def factored_state_bytes(shape: tuple[int, ...]) -> int:
    """fp32 factored second moment of one parameter."""
    if len(shape) >= 2:
        rows, cols = factored_shapes(shape)
        return F32 * (math.prod(rows) + math.prod(cols))
    return F32 * math.prod(shape)


class AdaLomoConfig(FusedConfig):
    eps: tuple[float, float] = (1e-30, 1e-3)  # (added to g², floor of the relative step size)
    clip_threshold: float = Field(1.0, gt=0)
    decay_rate: float = Field(-0.8, lt=0)


class AdaLomoTechnique(FusedTechnique):
    """`optimizer: {name: adalomo, lr: 0.001}` — factored second moment, in backward."""

    name = "adalomo"
    plan_options = ({},)
    full_weights_only = True
    Config = AdaLomoConfig

    def make_rule(self, groups: list[dict]) -> FusedRule:
        c = self.config
        return AdaLomo(groups, lr=c.lr, weight_decay=c.weight_decay, eps=c.eps, clip_threshold=c.clip_threshold,
                       decay_rate=c.decay_rate, clip_grad_value=c.clip_grad_value)

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        return factored_state_bytes(tuple(p.shape))
