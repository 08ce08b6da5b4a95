"""Forward gradient (Baydin et al. 2022, "Gradients without Backpropagation"; the forward-gradient baseline of
Zhang et al. 2024, "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark").

ĝ = (∇L · v) v with v ~ N(0, I): the directional derivative ∇L · v is computed *exactly* in one forward pass by
forward-mode AD (dual numbers), so the estimate is unbiased without the finite-difference error of SPSA. No backward
and no saved activations, but the tangents v (as big as the trainable parameters) and each activation's tangent are
live during the forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from memfit.errors import ConfigError
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.zo.spsa import Closure, ZStream, flat, inference_activation_bytes, mix_seed, trainable_named
from memfit.zo.technique import ZOStepTechnique


def parameter_owners(model: nn.Module, params: list[torch.Tensor]) -> list[list[tuple[nn.Module, str]]]:
    """Every (module, attribute) that holds each parameter (tied weights have several)."""
    where: dict[int, list[tuple[nn.Module, str]]] = {id(p): [] for p in params}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in where:
                where[id(p)].append((module, name))
    return [where[id(p)] for p in params]


class ForwardGradient(torch.optim.Optimizer):
    """SGD on forward gradients. `step(closure)`: the closure runs the model and returns the loss (no backward);
    the optimizer makes the trainable parameters dual tensors around it."""

    def __init__(self, params: Any, model: nn.Module, lr: float = 1e-4, n_samples: int = 1,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        if not lr >= 0:
            raise ConfigError(f"forward-gradient lr must be ≥ 0, got {lr}")
        if int(n_samples) < 1:
            raise ConfigError(f"n_samples must be ≥ 1, got {n_samples}")
        super().__init__(params, {"lr": lr, "n_samples": int(n_samples), "weight_decay": weight_decay, "seed": int(seed),
                                      "zo_step": 0})
        self.params = [p for g in self.param_groups for p in g["params"]]
        if not self.params:
            raise ConfigError("forward-gradient optimizer got no parameters; check which parameters require grad")
        self.owners = parameter_owners(model, self.params)
        missing = [i for i, o in enumerate(self.owners) if not o]
        if missing:
            raise ConfigError("forward-gradient: some parameters do not belong to the given model")
        self.last_projected: list[float] = []

    def _tangent(self, sample: int, index: int) -> torch.Tensor:
        g0 = self.param_groups[0]
        p = self.params[index]
        seed = mix_seed(g0["seed"], g0["zo_step"], sample, index)
        return ZStream(seed, p.device).next(p.numel()).to(p.dtype).view_as(p)

    def directional_derivative(self, closure: Closure, sample: int = 0) -> tuple[float, float]:
        """(L(θ), ∇L(θ)·v) for the step's `sample`-th tangent v, by one dual forward."""
        with torch.no_grad(), fwAD.dual_level():
            for i, (p, owners) in enumerate(zip(self.params, self.owners)):
                dual = fwAD.make_dual(p.detach(), self._tangent(sample, i))
                for module, name in owners:
                    module._parameters[name] = dual
            try:
                with sdpa_kernel([SDPBackend.MATH]):  # fused CPU/flash kernels have no forward-mode derivative
                    loss = closure()
            finally:
                for p, owners in zip(self.params, self.owners):
                    for module, name in owners:
                        module._parameters[name] = p
            primal, tangent = fwAD.unpack_dual(loss)
            if tangent is None:
                raise ConfigError("forward-gradient: the objective does not depend on the trainable parameters "
                                  "through differentiable operations (use objective: loss)")
            return float(primal), float(tangent)

    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise ConfigError("ForwardGradient.step needs a closure that returns the loss (no backward)")
        n = self.param_groups[0]["n_samples"]
        results = [self.directional_derivative(closure, i) for i in range(n)]
        self.last_projected = [d for _, d in results]
        self._update(self.last_projected)
        for g in self.param_groups:
            g["zo_step"] += 1
        return sum(loss for loss, _ in results) / n

    step.hooked = True  # type: ignore[attr-defined]  # forward passes are not optimizer work (see spsa.py)

    @torch.optim.Optimizer.profile_hook_step
    @torch.no_grad()
    def _update(self, projected: list[float]) -> None:
        n = len(projected)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                est = self._tangent(0, index).mul_(projected[0] / n)
                for i in range(1, n):
                    est.add_(self._tangent(i, index), alpha=projected[i] / n)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                flat(p).add_(est.view(-1), alpha=-group["lr"])
                del est
                index += 1


class ForwardGradStep(ZOStepTechnique):
    name = "forward-grad"
    differentiable_objective_only = True

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        c = self.config
        return ForwardGradient([p for _, p in trainable_named(ctx.model)], model=ctx.model, lr=c.lr,
                               n_samples=c.n_spsa, weight_decay=c.weight_decay, seed=self._seed(ctx))

    def temporary_bytes(self, spec: RunSpec) -> int:
        """The tangents of all trainable parameters are live during the dual forward."""
        return sum(p.nbytes for p in spec.model.trainable)

    def activation_bytes(self, spec: RunSpec) -> int:
        """Every live activation carries a tangent of its size."""
        return 2 * inference_activation_bytes(spec)

    def step_phases(self, spec: RunSpec, breakdown):
        """The parameters' tangents are live while the dual forward runs, beside its activations."""
        fixed = breakdown.parameters + breakdown.buffers + breakdown.optimizer + breakdown.kv_cache + breakdown.other
        return {"dual_forward": fixed + breakdown.activations + breakdown.temporaries}
