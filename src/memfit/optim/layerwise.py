"""Layer-wise (fused) optimizer updates: the step for a parameter runs inside backward, in its
`register_post_accumulate_grad_hook`, and its gradient is freed at once, so full gradients never coexist
(Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with Limited Resources" (LOMO) fused the
update into backward; Zhao et al. 2024 (GaLore) use per-layer weight updates the same way).

Works with any `torch.optim.Optimizer` whose `step()` iterates `param_groups` (all of torch's and memfit's): the
wrapped optimizer is stepped with `param_groups` temporarily narrowed to the one parameter whose gradient is ready,
so its state, hyper-parameters, `state_dict()` and LR-scheduler surface stay those of the one optimizer object.

Gradient accumulation: call `set_accumulating(True)` before the backward of every non-final micro-batch (the hooks
then leave the gradient to accumulate) and `set_accumulating(False)` before the last one (the hooks update and
free). With accumulation, gradients of earlier micro-batches must persist, so the saving applies to the final
backward only: peak gradient memory is one parameter's only when grad_accum == 1.

Gradient-norm clipping (`max_grad_norm`) is *deferred*: the global norm is only known once backward has finished,
after every parameter was already updated, so step t clips with the norm measured at step t-1 (step 1 is not
clipped). Trade-off: no extra compute or memory, but a sudden gradient spike is clipped one step late. The
alternative — a two-pass scheme (one backward to measure the norm, a second to update) — is exact but doubles
backward compute; it is not implemented. Call `step()` once after each optimizer step's backward: it applies no
update but closes the step (rolls the measured norm over; exposed as `last_grad_norm`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memfit.optim.base import named_trainable
from memfit.optim.wrapped import WrappedOptimizer
from memfit.techniques.base import Context

# MemTracker's own post-accumulate hook runs after ours and finds the gradient already freed; it only warns.
warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass of tensor")


class LayerwiseOptimizer(WrappedOptimizer):
    """Runs `optimizer`'s update for each parameter inside backward; `step()` only closes the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> None:
        super().__init__(optimizer)
        self.max_grad_norm = max_grad_norm
        self.clips_in_backward = max_grad_norm is not None
        self.accumulating = False
        self.last_grad_norm: float | None = None
        self._sq_norm = 0.0
        self._handles = []
        self._hooks: dict[Any, Any] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def set_accumulating(self, accumulating: bool) -> None:
        """True during the backward of a non-final micro-batch: gradients accumulate, nothing is updated."""
        self.accumulating = accumulating

    def step(self, closure: Callable | None = None):
        """Updates already ran inside backward; this closes the step (deferred clipping's norm roll-over)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.accumulating:
            self._check_hooks_fired()
        if self._sq_norm > 0.0:
            self.last_grad_norm = math.sqrt(self._sq_norm)
        self._sq_norm = 0.0
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        return {**state, "layerwise": {"last_grad_norm": self.last_grad_norm}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("layerwise", {}) or {}
        self.optimizer.load_state_dict(state_dict)
        self.last_grad_norm = extra.get("last_grad_norm")

    def remove_hooks(self) -> None:
        """Detach from the model (the parameters go back to ordinary gradient accumulation)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return f"LayerwiseOptimizer({self.optimizer!r}, max_grad_norm={self.max_grad_norm})"

    def _check_hooks_fired(self) -> None:
        """A hooked parameter still holding a gradient at `step()` was never updated inside backward."""
        hooked = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad] if self._handles \
            else []
        stale = sum(1 for p in hooked if p.grad is not None)
        if stale:
            from memfit.compat import fail

            raise fail(f"layer-wise optimizer: {stale} of {len(hooked)} parameters still hold their gradient at "
                       "step() (never updated inside backward)",
                       "torch's Tensor.register_post_accumulate_grad_hook to run once each gradient is accumulated",
                       ("torch",))

    # --- inside backward ------------------------------------------------------------------------------------
    def _hook(self, p: torch.Tensor) -> None:
        if self.accumulating or p.grad is None:
            return
        if self.max_grad_norm is not None:
            self._sq_norm += float(p.grad.detach().float().square().sum())
            if self.last_grad_norm is not None:
                coef = self.max_grad_norm / (self.last_grad_norm + 1e-6)
                if coef < 1.0:
                    p.grad.mul_(coef)
        self._step_one(p)
        p.grad = None

    def _step_one(self, p: torch.Tensor) -> None:
        opt = self.optimizer
        groups = opt.param_groups
        for group in groups:
            for i, q in enumerate(group["params"]):
                if q is p:
                    narrowed = {**group, "params": [p]}
                    if group.get("names") is not None:
                        narrowed["names"] = [group["names"][i]]
                    opt.param_groups = [narrowed]
                    try:
                        opt.step()
                    finally:
                        opt.param_groups = groups
                    # a group key the step changed (e.g. a counter) is written back
                    for key, value in narrowed.items():
                        if key not in ("params", "names") and group.get(key) is not value:
                            group[key] = value
                    return


def make_layerwise(optimizer_factory: Callable[..., torch.optim.Optimizer] | torch.optim.Optimizer,
                   model: nn.Module | Context, *, param_groups: list[dict] | None = None,
                   max_grad_norm: float | None = None) -> LayerwiseOptimizer:
    """Wrap an optimizer so every parameter is updated inside backward and its gradient freed at once.

    `optimizer_factory` is one of: a built optimizer; a callable taking a `Context` (when `model` is a Context —
    e.g. `lambda c: technique.build_optimizer(c)`; `max_grad_norm` then defaults to `ctx.grad_clip`); or a
    callable taking a list of param groups (when `model` is a module; groups default to one group of all
    trainable parameters with their names, so the factory's own defaults apply).
    """
    if isinstance(optimizer_factory, torch.optim.Optimizer):
        optimizer = optimizer_factory
    elif isinstance(model, Context):
        optimizer = optimizer_factory(model)
        if max_grad_norm is None:
            max_grad_norm = model.grad_clip
    else:
        groups = param_groups if param_groups is not None else [
            {"params": [p for _, p in named_trainable(model)], "names": [n for n, _ in named_trainable(model)]}]
        optimizer = optimizer_factory(groups)
    if isinstance(optimizer, LayerwiseOptimizer):
        return optimizer
    return LayerwiseOptimizer(optimizer, max_grad_norm=max_grad_norm)
