"""LOMO (Lv, Yang, Liu, Gao, Guo, Qiu 2023, "Full Parameter Fine-tuning for Large Language Models with Limited
Resources"): plain SGD fused into backward — each parameter is updated as soon as its gradient is ready and the
gradient is freed at once, so the only training memory beyond the weights and activations is one parameter's
gradient, and there is no optimizer state.

The fusing is memfit's one in-backward mechanism (`memfit.optim.layerwise.LayerwiseOptimizer`); this file adds the
update rule and the paper's gradient-norm clipping. The global norm is only known once backward has finished, so
LOMO clips with **two backward passes**: the first only measures every gradient's norm (and frees it), the second
updates with the gradients scaled by `min(1, max_norm / (norm + 1e-6))`. memfit's loop re-runs the forward for the
second pass (same RNG state, so dropout masks agree) instead of keeping the graph alive with `retain_graph` as the
authors' code does: one extra forward, but it composes with every activation technique and the graph is never held
across passes. Clipping with gradient accumulation is refused (the norm pass would have to keep every micro-batch's
gradients).

Conventions match the authors' package `lomo-optim` (0.1.1) for fp32 and bf16 runs: the gradient and the update
are computed in fp32 and written back in the parameter's dtype (round to nearest), weight decay is decoupled
(`p *= 1 - lr * wd` before `p -= lr * g`), `clip_grad_value` clamps each gradient before the norm scaling. Two
differences: weight decay skips 1-D parameters (memfit's grouping; the package decays all), and no loss scaling is
applied (the package scales only fp16 losses, which memfit does not train in).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from pydantic import Field, field_validator

from memfit.errors import ConfigError
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim.common import MemfitOptimizer, MemfitOptimizerTechnique
from memfit.optim.layerwise import LayerwiseOptimizer
from memfit.techniques.base import Batch, Context, ForwardBackward, TechniqueConfig


class FusedRule(MemfitOptimizer):
    """An update rule meant to run one parameter at a time inside backward (wrap it with `fuse`).

    `step()` takes each gradient in fp32, clamps it (`clip_grad_value`), scales it by the two-pass clipping
    coefficient when one is set, and hands it to `update`. The gradient is consumed: it may be changed in place.
    Inside `norm_pass()` it only records the gradients' norms (the first of LOMO's two passes).
    """

    def __init__(self, params: Iterable, defaults: dict) -> None:
        super().__init__(params, defaults)
        self.clip_coef: torch.Tensor | None = None
        self.gradients_seen = 0  # parameters handled since the counter was last reset (hook check)
        self._norms: list[torch.Tensor] | None = None

    @contextmanager
    def norm_pass(self, max_norm: float) -> Iterator[None]:
        """Inside: `step()` records gradient norms and updates nothing. After: `clip_coef` holds
        `min(1, max_norm / (global norm + 1e-6))` for the next pass's gradients."""
        self._norms = []
        try:
            yield
            norms = self._norms
        finally:
            self._norms = None
        if not norms:
            raise RuntimeError(f"the norm pass saw no gradient: the in-backward hooks did not run (torch "
                               f"{torch.__version__}); was backward called on a loss of this model?")
        total = torch.linalg.vector_norm(torch.stack(norms))
        self.clip_coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.closure_loss(closure)
        ready = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p, group in ready:  # inside backward (`fuse`): one parameter
            self._consume(p, p.grad.float(), group)  # the gradient itself when it is fp32
        return loss

    def _consume(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        self.gradients_seen += 1
        if self._norms is not None:
            self._norms.append(torch.linalg.vector_norm(grad))
            return
        if group["clip_grad_value"] is not None:
            grad.clamp_(-group["clip_grad_value"], group["clip_grad_value"])
        if self.clip_coef is not None:
            grad.mul_(self.clip_coef)
        self.update(p, grad, group, self.state[p])

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError


def write_back(p: torch.Tensor, p_fp32: torch.Tensor) -> None:
    """Store an fp32 working copy into a lower-precision parameter (nothing to do when `p` is fp32)."""
    if p_fp32 is not p:
        p.copy_(p_fp32)


class Lomo(FusedRule):
    """LOMO's update: `p *= 1 - lr * wd; p -= lr * g`, in fp32."""

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0,
                 clip_grad_value: float | None = None) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value))

    def update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        p_fp32 = p.float()
        if wd > 0:
            p_fp32.mul_(1.0 - lr * wd)
        p_fp32.add_(grad, alpha=-lr)
        write_back(p, p_fp32)


def fuse(rule: FusedRule) -> LayerwiseOptimizer:
    """`rule` applied inside backward. Clipping is the two-pass scheme (`two_pass_clipping`), never the wrapper's
    deferred clipping nor the loop's `clip_grad_norm_`."""
    optimizer = LayerwiseOptimizer(rule, max_grad_norm=None)
    optimizer.clips_in_backward = True
    return optimizer


def _rule_of(optimizer) -> FusedRule:
    rule = getattr(optimizer, "optimizer", None)
    if not isinstance(optimizer, LayerwiseOptimizer) or not isinstance(rule, FusedRule):
        raise TypeError(f"expected a fused LOMO-style optimizer, got {optimizer!r}")  # a bug, not a user error
    return rule


def two_pass_clipping(fb: ForwardBackward, ctx: Context) -> ForwardBackward:
    """LOMO's clipping: a forward+backward that only measures the global gradient norm, then the same
    forward+backward (RNG state restored) updating with the scaled gradients."""
    rule = _rule_of(ctx.optimizer)
    devices = [ctx.device] if ctx.device.type == "cuda" else []

    def forward_backward(model: torch.nn.Module, batch: Batch, loss_scale: float) -> torch.Tensor:
        with torch.random.fork_rng(devices=devices), rule.norm_pass(ctx.grad_clip):
            fb(model, batch, loss_scale)
        return fb(model, batch, loss_scale)

    return forward_backward


def checked_updates(fb: ForwardBackward, ctx: Context) -> ForwardBackward:
    """Fail loudly if a final backward updated nothing (the gradient hooks did not fire)."""
    rule = _rule_of(ctx.optimizer)

    def forward_backward(model: torch.nn.Module, batch: Batch, loss_scale: float) -> torch.Tensor:
        rule.gradients_seen = 0
        loss = fb(model, batch, loss_scale)
        if not ctx.optimizer.accumulating and rule.gradients_seen == 0:
            raise RuntimeError(f"{type(rule).__name__}: backward ran but no parameter was updated inside it "
                               f"(register_post_accumulate_grad_hook did not fire; torch {torch.__version__})")
        return loss

    return forward_backward


class FusedConfig(TechniqueConfig):
    """Options of the LOMO family (always in backward; `train.clip_grad_norm` clips with two passes)."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    clip_grad_value: float | None = Field(None, gt=0)
    layerwise: bool = True  # read by techniques that cannot run with in-backward updates

    @field_validator("layerwise")
    @classmethod
    def _always_fused(cls, value: bool) -> bool:
        if not value:
            raise ValueError("LOMO and AdaLomo always update inside backward; for SGD after backward use "
                             "optimizer: sgd")
        return value


class FusedTechnique(MemfitOptimizerTechnique):
    """Builds a `FusedRule` applied inside backward, with the paper's two-pass clipping in the train step."""

    def make_rule(self, groups: list[dict]) -> FusedRule:
        raise NotImplementedError

    def make_optimizer(self, groups: list[dict]) -> LayerwiseOptimizer:
        return fuse(self.make_rule(groups))

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        return 0

    def check(self, ctx: Context) -> None:
        if ctx.grad_clip is not None and ctx.spec.grad_accum > 1:
            raise ConfigError(f"{self.name} clips the gradient norm with two backward passes, which cannot span "
                              f"accumulated micro-batches; set train.clip_grad_norm: null or train.grad_accum: 1")

    def wrap_forward_backward(self, fb: ForwardBackward, ctx: Context) -> ForwardBackward:
        fb = checked_updates(fb, ctx)
        return two_pass_clipping(fb, ctx) if ctx.grad_clip is not None else fb


class LomoConfig(FusedConfig):
    pass


class LomoTechnique(FusedTechnique):
    """`optimizer: {name: lomo, lr: 0.01}` — SGD inside backward, no optimizer state."""

    name = "lomo"
    Config = LomoConfig

    def make_rule(self, groups: list[dict]) -> FusedRule:
        c = self.config
        return Lomo(groups, lr=c.lr, weight_decay=c.weight_decay, clip_grad_value=c.clip_grad_value)
