"""Optimizer updates for weights stored in 16 bits (`bf16-true`, `16-true`) and optimizer state in another dtype.

A 16-bit weight cannot absorb an update much smaller than itself: rounded to nearest, `w + lr·u` is `w` again
whenever |lr·u| < ulp(w)/2, and training stalls (Zamirai, Zhang, De Sa, Kuchaiev 2020, "Revisiting BFloat16
Training"). Two remedies, `train.master_weights`:

- `fp32`: an fp32 master copy of every trained parameter lives in the optimizer (Micikevicius et al. 2018, "Mixed
  Precision Training"); the update is applied to it and the weight is its round-to-nearest bf16/fp16 image. Costs
  4 bytes per trained value.
- `none` (default): the update is computed in fp32 from the 16-bit weight and rounded **stochastically** back
  (Zamirai et al. 2020): round up with probability equal to the distance to the lower neighbour in ulps, so the
  stored weight is unbiased, E[round(x)] = x. As in torchao's `_AdamW(bf16_stochastic_round=True)`: add uniform
  random bits below the kept mantissa to the fp32 pattern, then truncate (`stochastic_round`).

`PrecisionOptimizer` wraps any whole-step optimizer: it steps one parameter at a time, giving the inner optimizer
an fp32 view of that parameter (the master copy itself, or a temporary upcast) and its gradient in fp32, so the
inner optimizer's state is created in fp32; `state_dtype` (AdamW/SGD: `bf16`) stores each state tensor shaped like
the parameter in that dtype between steps. The transients of a step are one parameter's fp32 copies.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks

from memfit.memory.arch.parts import F32
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.precision import TORCH_DTYPES
from memfit.memory.spec import DTYPE_BYTES, RunSpec
from memfit.optim.wrapped import WrappedOptimizer, WrappedTechnique
from memfit.techniques.base import Context, OptimizerTechnique


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """`x` (fp32) rounded to `dtype` stochastically: up with probability (x − lo)/(hi − lo), so E = x.

    Add a uniform random integer below the kept mantissa to the fp32 bit pattern and clear those bits (the carry
    rounds up exactly when the random number exceeds the distance to the next representable value): the low 16
    bits for bf16 (torchao's rule), the low 13 for fp16, whose conversion is then exact in fp16's normal range
    (below 2^-14 fp16 keeps fewer bits and the conversion rounds to nearest)."""
    dropped = {torch.bfloat16: 16, torch.float16: 13}.get(dtype)
    if dropped is None:
        return x.to(dtype)
    bits = x.float().view(torch.int32)
    noise = torch.randint(0, 1 << dropped, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -(1 << dropped)  # clear the dropped bits (two's complement mask)
    return rounded.view(torch.float32).to(dtype)


ROUNDING_BYTES = {"bf16": 12, "fp16": 12}
"""Transients per value of `stochastic_round`: the random int32 bits, their sum with the pattern and the masked
pattern (measured on llama-1m and llama-tiny at batch 1, where the optimizer step holds the peak)."""


class PrecisionOptimizer(WrappedOptimizer):
    """Runs `optimizer` one parameter at a time on an fp32 view of it (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, master_weights: bool = False, stochastic: bool = True,
                 state_dtype: str | None = None, seed: int = 0) -> None:
        super().__init__(optimizer)
        self.master_weights = master_weights
        self.stochastic = stochastic and not master_weights
        self.state_dtype = TORCH_DTYPES[state_dtype] if state_dtype else None
        self.generator = torch.Generator().manual_seed(seed)
        self.master: dict[torch.Tensor, torch.Tensor] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def state(self):
        """The inner optimizer's state; with master weights, a view that adds each parameter's fp32 `master` (so
        the meter and `state_bytes` count it as optimizer state) and whose `pop(p)` frees both (LISA / BAdam drop
        a deactivated layer's state so; its master is made again from the weight when it trains next)."""
        if not self.master_weights:
            return self.optimizer.state
        return _StateView(self)

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    def _moments(self, p: torch.Tensor) -> list[str]:
        return [k for k, v in self.optimizer.state.get(p, {}).items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape]

    @torch.no_grad()
    def step(self, closure=None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for p in self._params() if p.grad is not None]
        grads = {p: p.grad for p in params}
        for p in params:
            p.grad = None
        for p in params:
            self._step_one(p, grads.pop(p))
        for hook in list(_global_optimizer_post_hooks.values()):  # as torch's own step: trackers see the state
            hook(self, (), {})
        return loss

    def _step_one(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        stored = p.dtype
        if stored == torch.float32 and self.state_dtype is None:
            p.grad = grad
            self.optimizer.step()
            p.grad = None
            return
        state = self.optimizer.state.get(p, {})
        for k in self._moments(p):
            state[k] = state[k].float()
        low = p.data
        if self.master_weights and stored != torch.float32 and p not in self.master:
            self.master[p] = low.float()  # made when the parameter first trains, like the optimizer's state
        p.data = self.master[p] if p in self.master else low.float()
        p.grad = grad.float()
        try:
            self.optimizer.step()
        finally:
            p.grad = None
            wide, p.data = p.data, low
        if stored != torch.float32:
            low.copy_(stochastic_round(wide, stored, self.generator) if self.stochastic else wide.to(stored))
        else:
            low.copy_(wide)
        if self.state_dtype is not None:
            state = self.optimizer.state[p]  # made by this step on the first one
            for k in self._moments(p):
                state[k] = state[k].to(self.state_dtype)

    def state_dict(self) -> dict[str, Any]:
        out = self.optimizer.state_dict()
        params = self._params()
        out["precision"] = {"rng": self.generator.get_state(),
                            "master": {str(i): self.master[p] for i, p in enumerate(params) if p in self.master}}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("precision", {})
        saved = {(pid, k): v for pid, st in state_dict["state"].items() for k, v in st.items()
                 if isinstance(v, torch.Tensor)}
        self.optimizer.load_state_dict(state_dict)  # torch casts floating state to the parameter's dtype...
        params = self._params()
        for (pid, k), value in saved.items():  # ...so fp32 moments of a bf16 weight are put back as saved
            st = self.optimizer.state[params[int(pid)]]
            if st[k].dtype != value.dtype:
                st[k] = value.to(st[k].device, copy=True)
        self.master = {params[int(i)]: saved.float().clone() for i, saved in extra.get("master", {}).items()}
        if "rng" in extra:
            self.generator.set_state(extra["rng"])


class _StateView(dict):
    """`PrecisionOptimizer.state` with master weights: the inner state plus each `master`; `pop` frees both."""

    def __init__(self, owner: PrecisionOptimizer) -> None:
        super().__init__({p: dict(st) for p, st in owner.optimizer.state.items()})
        for p, m in owner.master.items():
            self.setdefault(p, {})["master"] = m
        self.owner = owner

    def pop(self, p, default=None):
        self.owner.master.pop(p, None)
        return self.owner.optimizer.state.pop(p, default)


def wrap_for_precision(optimizer: torch.optim.Optimizer, *, master_weights: bool, true_low: bool,
                       state_dtype: str | None, seed: int) -> torch.optim.Optimizer:
    """`optimizer` wrapped when weights are stored in 16 bits or its state takes another dtype, else itself."""
    if not true_low and state_dtype is None:
        return optimizer
    return PrecisionOptimizer(optimizer, master_weights=master_weights, stochastic=true_low,
                              state_dtype=state_dtype, seed=seed)


class PrecisionTechnique(WrappedTechnique):
    """The recipe's optimizer technique, run through `PrecisionOptimizer` (the recipe puts it in the optimizer
    slot's place when weights are stored in 16 bits or `state_dtype` is set); its memory story: the inner
    optimizer's state as if its parameters were fp32 (or `state_dtype`), the master copy, one parameter's fp32
    copies as the step's transients."""

    def __init__(self, inner: OptimizerTechnique, master_weights: bool, true_low: bool) -> None:
        super().__init__(inner)
        self.master_weights = master_weights and true_low
        self.true_low = true_low
        self.state_dtype = getattr(inner.config, "state_dtype", None)

    def _state_view(self, spec: RunSpec) -> RunSpec:
        """The parameters as the inner optimizer sees them during its step (fp32), its state stored in
        `state_dtype` (else fp32 when it steps an upcast view, else each parameter's own dtype)."""
        size = DTYPE_BYTES[self.state_dtype] if self.state_dtype else (F32 if self.true_low else None)
        if size is None:
            return spec
        params = tuple(replace(p, bytes_per_element=size) if p.trainable else p for p in spec.model.params)
        return spec.with_(model=replace(spec.model, params=params))

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        return wrap_for_precision(self.inner.build_optimizer(ctx), master_weights=self.master_weights,
                                  true_low=self.true_low, state_dtype=self.state_dtype, seed=ctx.seed)

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        inner = self.inner.transform_spec(self._state_view(spec))
        transients = inner.extra.get("optimizer_step_transients")
        n = max((p.numel for p in spec.model.trainable), default=0)
        if transients is None:  # torch-style: two of the fp32 parameter's size
            transients = 2 * F32 * n
        weight = 0 if self.master_weights or not self.true_low else F32 * n  # the upcast weight (not the master)
        # the moments upcast for the step (stored again in state_dtype once the weight is rounded)
        moments = 2 * (F32 - DTYPE_BYTES[self.state_dtype]) * n if self.state_dtype else 0
        # while the inner optimizer steps: the fp32 weight and gradient beside its own transients; then, the
        # gradient freed, the weight is rounded back (stochastic rounding's draws and bit patterns)
        rounding = ROUNDING_BYTES.get(spec.policy.storage, 0) * n if self.true_low and not self.master_weights else 0
        transients = moments + max(weight + F32 * n + transients, weight + rounding)
        return spec.with_(extra={**spec.extra, "optimizer_step_transients": transients})

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        out = self.inner.estimate(self._state_view(spec), base)
        master = sum(F32 * p.numel for p in spec.model.trainable if p.bytes_per_element != F32) \
            if self.master_weights else 0
        # gradients: the inner optimizer's own story (e.g. q_galore's int8 layers have none) in the weights'
        # storage dtype, not the fp32 view its state is sized by
        gradients = self.inner.estimate(spec, base).gradients
        return out.with_(optimizer=out.optimizer + master, gradients=gradients)
