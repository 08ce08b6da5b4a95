"""The protocol every technique implements (DESIGN §1).

A technique belongs to one *slot* — the place in a run it changes:

| slot          | at most | what it does                                              | examples                 |
|---------------|---------|-----------------------------------------------------------|--------------------------|
| `weights`     | one     | stores frozen base weights differently                    | int8, NF4, AWQ, stream   |
| `adapter`     | one     | chooses what trains (adds adapters, samples layers)       | LoRA, QLoRA, LISA, LST   |
| `activations` | many    | changes what forward saves / how loss and backward run    | checkpointing, chunked CE|
| `optimizer`   | one     | builds the `torch.optim.Optimizer` (default AdamW)        | GaLore, APOLLO, 8-bit    |
| `step`        | one     | replaces the whole train step (default backprop)          | MeZO, ZO-Adam            |
| `kv`          | one     | a `transformers` Cache policy for generation              | H2O, StreamingLLM, KIVI  |

The run loop calls, in order: `check` → `apply` (model edits) → optimizer slot `build_optimizer` →
`wrap_loss` / `wrap_forward_backward` → step slot `make_train_step`; then `on_step_start` / `on_step_end`
around every optimizer step. Every hook has a do-nothing default, so a technique writes only what it changes.

Estimates compose the same way (`memfit.memory.estimate.estimate_step`, in `ESTIMATE_ORDER`): `transform_spec`
lets a technique change the shapes others see (LoRA adds adapter parameters and freezes the base; quantization
shrinks bytes per element); then `estimate(spec, base)` returns `base` with the technique's own categories
replaced; `step_phases(spec, breakdown)` returns the step's phases where the technique changes how a step runs
(checkpointing recomputes, StreamBP walks chunks), else None. Everything a technique knows about its memory
lives in these three methods of its own class; precision, placement and sharding will reach them through `spec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec

ESTIMATE_ORDER = ("weights", "adapter", "activations", "step", "optimizer", "kv")
"""Slots are applied and estimated in this order, so e.g. the optimizer sees the adapter's trainable parameters."""

QUANTIZED_WEIGHT_MARK = "memfit_quantized_weight"
"""Class attribute (True) of modules that store their weight in a quantized format (`weights.quant.QuantLinear`):
adapters that wrap `nn.Linear` read it to refuse such layers without importing the weights package."""

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
"""(model, batch) -> scalar loss tensor (mean over tokens/examples of that batch)."""
ForwardBackward = Callable[[nn.Module, Batch, float], torch.Tensor]
"""(model, batch, loss_scale) -> detached loss; runs backward of loss*loss_scale, gradients accumulate in .grad."""
TrainStep = Callable[[list[Batch]], float]
"""(micro-batches of one optimizer step) -> mean loss; performs the whole update."""


class TechniqueConfig(BaseModel):
    """Base of every technique's config; unknown keys are errors that name the allowed ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


@dataclass
class Context:
    """What techniques see and may change while a run is built and while it runs."""

    model: nn.Module
    spec: RunSpec
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    loss_fn: LossFn | None = None
    optimizer: torch.optim.Optimizer | None = None
    grad_clip: float | None = None
    step: int = 0
    seed: int = 0
    techniques: list[Technique] = field(default_factory=list)
    data: Any = None  # the run's train data (calibration, importance scores); may be None in tests
    grad_scaler: Any = None  # torch.amp.GradScaler under 16-mixed (dynamic loss scaling), else None

    def has_quantized_base(self) -> bool:
        """The run's linear layers are (or, once techniques apply, will be) stored quantized: a module carries
        `QUANTIZED_WEIGHT_MARK`, or a `weights` technique is in the recipe (checks run before any applies)."""
        return (any(getattr(m, QUANTIZED_WEIGHT_MARK, False) for m in self.model.modules())
                or any(t.slot == "weights" for t in self.techniques or []))


class Technique:
    """One method from one paper. Subclasses set `name`, `slot`, `Config` and override what they change."""

    name: ClassVar[str]
    slot: ClassVar[str]
    Config: ClassVar[type[TechniqueConfig]] = TechniqueConfig
    needs_gradients: ClassVar[bool] = False  # True where the method only makes sense with backprop
    trains_base: ClassVar[bool] = False  # an adapter-slot technique that trains the model's own weights (LISA)

    # --- what `memfit plan` may combine: each technique declares it (memfit.plan.space enumerates) ---
    plan_options: ClassVar[tuple[dict[str, Any], ...]] = ()  # option sets the planner tries; () = never planned
    tasks: ClassVar[tuple[str, ...] | None] = None  # tasks it applies to (None: every task)
    conflicts: ClassVar[tuple[str, ...]] = ()  # names of techniques it cannot run with; "layerwise": in-backward
    # optimizer updates; "activations": every activation technique
    needs_pretrained: ClassVar[bool] = False  # only sensible on pretrained weights (never planned from scratch)
    plan_lr_scale: ClassVar[float] = 1.0  # the planner multiplies the user's learning rate by this
    libraries: ClassVar[tuple[str, ...]] = ()  # optional packages it imports (their RSS: `memory/runtime.py`)
    allocator_churn: ClassVar[float] = 0.0  # extra CPU allocator churn per byte of `runtime.transient_volume`

    @classmethod
    def plan_variants(cls, spec: RunSpec, pretrained: bool = False) -> list[dict[str, Any]]:
        """Recipe values (`{name, ...options}`) the planner tries for this run (`pretrained`: it starts from
        pretrained weights); from `plan_options` by default."""
        return [{"name": cls.name, **options} for options in cls.plan_options]

    def conflict_with(self, other: Technique) -> str | None:
        """Why this technique cannot run with `other` (by the declared `conflicts` of either), or None."""
        for a, b in ((self, other), (other, self)):
            for c in a.conflicts:
                if (c == b.name or c == b.slot or (c == "layerwise" and getattr(b.config, "layerwise", False))):
                    return f"{a.name} cannot run with {b.name if c != 'layerwise' else 'layer-wise updates'}"
        return None

    def __init__(self, config: TechniqueConfig | None = None) -> None:
        self.config = config if config is not None else self.Config(name=self.name)

    # --- building a run --------------------------------------------------------------------------
    def check(self, ctx: Context) -> None:
        """Raise `ConfigError` if this technique cannot apply to `ctx.model` / the other techniques."""

    def apply(self, ctx: Context) -> None:
        """Edit the model in place or replace `ctx.model` (wrap, quantize, add adapters, install hooks)."""

    def wrap_loss(self, loss_fn: LossFn, ctx: Context) -> LossFn:
        return loss_fn

    def wrap_forward_backward(self, fb: ForwardBackward, ctx: Context) -> ForwardBackward:
        return fb

    # --- running ---------------------------------------------------------------------------------
    def on_step_start(self, ctx: Context) -> None:
        """Called before each optimizer step (e.g. LISA resamples the active layers here)."""

    def on_step_end(self, ctx: Context, metrics: dict[str, float]) -> None:
        """Called after each optimizer step; may add entries to `metrics`."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable loop state needed for exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- estimating ------------------------------------------------------------------------------
    @property
    def order(self) -> int:
        """Place in the estimate's composition: the slot's rank in `ESTIMATE_ORDER`."""
        return ESTIMATE_ORDER.index(self.slot)

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        """The shapes the techniques after this one see (parameters added, frozen, re-stored; facts recorded)."""
        return spec

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """`base` with this technique's own categories replaced by what it should take."""
        return base

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int] | None:
        """Tensor totals at the moments a step can peak, where this technique changes how a step runs; None
        leaves the phases to another technique or to plain backprop (`memfit.memory.estimate.backprop_phases`)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class AdapterTechnique(Technique):
    """The `adapter` slot for a method that fine-tunes pretrained weights through backprop (never planned from
    scratch), at the adapters' larger learning rate."""

    slot = "adapter"
    needs_gradients = True
    needs_pretrained = True
    plan_options: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    plan_lr_scale = 10.0  # bench fewer-params runs adapters at 1e-3 against full fine-tuning's 1e-4


class OptimizerTechnique(Technique):
    """The `optimizer` slot: builds a `torch.optim.Optimizer` over the trainable parameters."""

    slot = "optimizer"
    needs_gradients = True
    full_weights_only: ClassVar[bool] = False  # True: works on whole weight matrices; never planned with an adapter

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        raise NotImplementedError


class StepTechnique(Technique):
    """The `step` slot: replaces the whole train step (backprop is the default)."""

    slot = "step"
    owns_optimizer: ClassVar[bool] = False  # True: builds its own update rule; the optimizer slot must stay default

    def make_train_step(self, ctx: Context, forward_backward: ForwardBackward) -> TrainStep:
        raise NotImplementedError
