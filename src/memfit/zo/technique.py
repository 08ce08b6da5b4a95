"""The `step` slot for zeroth-order methods: each variant's technique builds its own optimizer and a train step that
runs only forward passes (no backward, no gradients).

Relation to the `optimizer` slot: a ZO step technique *is* the optimizer — it builds its `ZOOptimizer`, puts it in
`ctx.optimizer` (so LR schedules and checkpoints use it), and takes lr / weight decay from `step:`. A recipe may
therefore not also choose an optimizer (anything but the untouched default AdamW is a `ConfigError`), nor any
technique that needs backprop (`needs_gradients`: activation checkpointing, layer-wise updates, …).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context, ForwardBackward, StepTechnique, TechniqueConfig, TrainStep
from memfit.zo.objectives import objective_fn
from memfit.zo.spsa import chunk_bytes, inference_activation_bytes, trainable_named


class ZOConfig(TechniqueConfig):
    """Options every zeroth-order step accepts."""

    lr: float = Field(1e-6, ge=0)
    eps: float = Field(1e-3, gt=0, description="perturbation scale ε")
    n_spsa: int = Field(1, ge=1, description="perturbations averaged per step")
    weight_decay: float = Field(0.0, ge=0)
    objective: Literal["loss", "accuracy", "f1"] = "loss"
    exact: bool = True
    seed: int | None = None  # default: the run's seed


def _is_default_optimizer(t: Any) -> bool:
    return t.name == "adamw" and t.config == type(t.config)(name="adamw")


class ZOStepTechnique(StepTechnique):
    """Base of the ZO step techniques; subclasses set `name`, `Config` and `build_optimizer`."""

    Config: ClassVar[type[TechniqueConfig]] = ZOConfig
    owns_optimizer = True
    differentiable_objective_only: ClassVar[bool] = False
    state_per_param: ClassVar[int] = 0
    """Optimizer-state tensors per trainable parameter (each as big as the parameter)."""

    def __init__(self, config: TechniqueConfig | None = None) -> None:
        super().__init__(config)
        self.optimizer: torch.optim.Optimizer | None = None

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        raise NotImplementedError

    def check(self, ctx: Context) -> None:
        c = self.config
        if self.differentiable_objective_only and c.objective != "loss":
            raise ConfigError(f"step '{self.name}' differentiates the objective (forward-mode AD); "
                              f"objective '{c.objective}' is not differentiable — use objective: loss or an SPSA "
                              "variant (mezo, zo-sign, zo-momentum, zo-adam, zo-block)")
        for t in ctx.techniques:
            if t is self:
                continue
            if t.slot == "optimizer":
                if not _is_default_optimizer(t):
                    raise ConfigError(f"step '{self.name}' is its own optimizer: remove `optimizer: {t.name}` from "
                                      f"the recipe and set lr / weight_decay under `step:`")
            elif t.slot in ("adapter", "weights"):
                continue  # they choose *what* trains and how the frozen base is stored: ZO works on any subset
            elif t.needs_gradients:
                raise ConfigError(f"{t.slot} technique '{t.name}' needs backprop, but step '{self.name}' runs "
                                  "forward passes only: remove one of them")
        if not trainable_named(ctx.model):
            raise ConfigError("the model has no trainable parameters; check the adapter settings")

    def make_train_step(self, ctx: Context, forward_backward: ForwardBackward) -> TrainStep:
        model = ctx.model
        opt = self.build_optimizer(ctx)
        self.optimizer = opt
        ctx.optimizer = opt
        objective = objective_fn(self.config.objective, ctx.spec.task, ctx.loss_fn)
        autocast = ctx.spec.policy.autocast_context  # forwards run in the run's precision, as backprop's do

        def train_step(micro_batches: list[dict[str, torch.Tensor]]) -> float:
            def closure() -> torch.Tensor:
                # dropout off: L(θ+εz) and L(θ−εz) must see the same function (as in the MeZO reference)
                was_training = model.training
                model.eval()
                try:
                    with autocast(ctx.device):
                        total = sum(objective(model, mb).float() for mb in micro_batches)
                finally:
                    model.train(was_training)
                return total / len(micro_batches)

            return float(opt.step(closure))

        return train_step

    def _seed(self, ctx: Context) -> int:
        return self.config.seed if self.config.seed is not None else ctx.seed

    def _common(self, ctx: Context) -> dict[str, Any]:
        c = self.config
        return {"lr": c.lr, "eps": c.eps, "n_spsa": c.n_spsa, "weight_decay": c.weight_decay, "seed": self._seed(ctx),
                    "exact": c.exact}

    # --- estimates -------------------------------------------------------------------------------
    def optimizer_bytes(self, spec: RunSpec) -> int:
        return self.state_per_param * sum(p.nbytes for p in spec.model.trainable)

    def temporary_bytes(self, spec: RunSpec) -> int:
        return chunk_bytes(spec, self.config.n_spsa)

    def activation_bytes(self, spec: RunSpec) -> int:
        return inference_activation_bytes(spec)

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """No gradients; the variant's own state; one inference forward's transient activations."""
        return base.with_(gradients=0, optimizer=self.optimizer_bytes(spec), activations=self.activation_bytes(spec),
                          temporaries=self.temporary_bytes(spec))

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
        """A zeroth-order step has no backward: its tensor total peaks in one of its no-grad forwards (the weights,
        the variant's state and the forward's transient activations) or while it perturbs or updates the weights
        one chunk at a time (the chunk's temporaries); plain backprop's phases (the loss head's gradients, a
        block's backward) never happen."""
        fixed = breakdown.parameters + breakdown.buffers + breakdown.optimizer + breakdown.kv_cache + breakdown.other
        return {"forward": fixed + breakdown.activations, "perturb": fixed + breakdown.temporaries}
