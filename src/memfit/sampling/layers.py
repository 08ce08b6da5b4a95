"""Shared machinery of layer sampling: find the transformer layers, switch which of them train, and free what
the switched-off layers held — their gradients *and their optimizer state* (LMFlow's LISA keeps the state of
deactivated layers, its issue #729, so its memory creeps up to full fine-tuning; we drop it and let the optimizer
re-create it when the layer comes back, as BAdam does).

The optimizer is built once over every parameter that may ever train (the sampler leaves them all trainable
until the first step) and only ever holds state for the active ones: `torch.optim` optimizers create state
lazily for parameters whose `.grad` is set, and skip parameters without one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from memfit.errors import ConfigError
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.techniques.base import Context, Technique, TechniqueConfig

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
CLS_HEADS = ("classifier", "score")


def layer_index(name: str) -> int | None:
    """The transformer-layer index a parameter name belongs to (`model.layers.3.mlp...` -> 3), else None."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def is_cls_head(name: str) -> bool:
    return any(part in CLS_HEADS for part in name.split("."))


def group_by_layer(named: Iterable[tuple[str, Any]]) -> tuple[dict[int, list[tuple[str, Any]]], list[tuple[str, Any]]]:
    """({layer index: [(name, x)]}, [(name, x) outside the layers])."""
    layers: dict[int, list[tuple[str, Any]]] = {}
    outside = []
    for name, x in named:
        i = layer_index(name)
        (layers.setdefault(i, []) if i is not None else outside).append((name, x))
    return layers, outside


def seeded_generator(seed: int, k: int) -> torch.Generator:
    """The RNG of sampling round `k`: a pure function of (seed, k), so resuming needs no RNG state."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(k))


class ActiveLayers:
    """Which layers' parameters train now; switching frees gradients and optimizer state of those leaving."""

    def __init__(self, layers: dict[int, list[nn.Parameter]], free_state: bool = True) -> None:
        self.layers = layers
        self.free_state = free_state
        self.active: list[int] | None = None

    def all_trainable(self) -> None:
        for params in self.layers.values():
            for p in params:
                p.requires_grad_(True)

    def switch(self, active: list[int], optimizer: torch.optim.Optimizer | None) -> None:
        keep = set(active)
        for i, params in self.layers.items():
            on = i in keep
            for p in params:
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    if self.free_state and optimizer is not None:
                        optimizer.state.pop(p, None)
        self.active = sorted(keep)

    def verify(self, optimizer: torch.optim.Optimizer | None, who: str) -> None:
        """After a step: switched-off layers got no gradient and (with `free_state`) the optimizer made no state
        for them — torch optimizers skip parameters whose `.grad` is None; one that does not would silently
        train (or hold state for) every layer."""
        keep = set(self.active or [])
        off = [p for i, params in self.layers.items() if i not in keep for p in params]
        graded = sum(1 for p in off if p.grad is not None)
        stateful = sum(1 for p in off if optimizer is not None and self.free_state and optimizer.state.get(p))
        if graded or stateful:
            from memfit.compat import fail

            what = f"{graded} gradients" if graded else f"optimizer state ({type(optimizer).__name__})"
            raise fail(f"adapter '{who}': {what} for parameters of inactive layers after a step",
                       "autograd to skip parameters with requires_grad=False and the optimizer to create state "
                       "only for parameters that have a .grad", ("torch",))


def mark_trainable(spec: RunSpec, trainable: callable) -> RunSpec:
    """`spec` with each parameter's trainable flag set by `trainable(ParamInfo) -> bool`."""
    params = tuple(replace(p, trainable=bool(trainable(p))) for p in spec.model.params)
    return spec.with_(model=replace(spec.model, params=params))


def largest_layers(params: Iterable[ParamInfo], k: int) -> set[int]:
    """The `k` layers holding the most trainable bytes: the worst case a sampler can activate."""
    size: dict[int, int] = {}
    for p in params:
        i = layer_index(p.name)
        if i is not None and p.trainable:
            size[i] = size.get(i, 0) + p.nbytes
    return {i for i, _ in sorted(size.items(), key=lambda kv: (-kv[1], kv[0]))[:k]}


class LayerSamplerConfig(TechniqueConfig):
    interval: int = Field(20, ge=1, description="steps between re-sampling the active layers (K)")
    layers: int = Field(2, ge=1, description="layers trained at a time (gamma)")
    free_state: bool = Field(True, description="free optimizer state of deactivated layers (false = LMFlow's bug)")


class LayerSampler(Technique):
    """Base of LISA / OwLore / BAdam: every `interval` steps choose `n_active` layers; only they (and, per
    method, the parameters outside the layers) train."""

    slot = "adapter"
    needs_gradients = True
    trains_base = True  # the model's own layers train (in the precision's storage dtype)
    Config = LayerSamplerConfig
    outside: ClassVar[Literal["all", "cls_head"]] = "all"
    """Which parameters outside the transformer layers always train: all (embeddings, norms, head) or only a
    classification head."""

    def __init__(self, config: TechniqueConfig | None = None) -> None:
        super().__init__(config)
        self.round: int | None = None
        self.seed = 0
        self._layers: ActiveLayers | None = None
        self._dirty = True

    # --- what each method decides ------------------------------------------------------------------
    def n_active(self, n_layers: int) -> int:
        return self.config.layers

    def select(self, k: int, n_layers: int) -> list[int]:
        """The layers active during round `k` (steps k*interval ... (k+1)*interval-1)."""
        raise NotImplementedError

    def prepare(self, ctx: Context, layers: dict[int, list[tuple[str, nn.Parameter]]]) -> None:
        """Hook after the layers are found (e.g. OwLore scores them)."""

    # --- building ----------------------------------------------------------------------------------
    def _find(self, model: nn.Module):
        layers, outside = group_by_layer(model.named_parameters())
        if not layers:
            raise ConfigError(f"adapter '{self.name}': found no transformer layers (parameters named "
                              f"'layers.N.' / 'layer.N.' / 'h.N.') in this model")
        return layers, outside

    def check(self, ctx: Context) -> None:
        layers, _ = self._find(ctx.model)
        n = self.n_active(len(layers))
        if n > len(layers):
            raise ConfigError(f"adapter '{self.name}': layers={n} but the model has only {len(layers)} layers; "
                              f"choose layers between 1 and {len(layers)}")
        for t in ctx.techniques:
            if t.slot == "optimizer" and getattr(t.config, "layerwise", False):
                raise ConfigError(f"adapter '{self.name}' frees deactivated layers' optimizer state between steps, "
                                  f"which layer-wise updates bypass; set optimizer.layerwise: false")

    def _trains_outside(self, name: str) -> bool:
        return self.outside == "all" or is_cls_head(name)

    def apply(self, ctx: Context) -> None:
        layers, outside = self._find(ctx.model)
        self.seed = ctx.seed
        for name, p in outside:
            p.requires_grad_(self._trains_outside(name))
        self._layers = ActiveLayers({i: [p for _, p in ps] for i, ps in layers.items()},
                                    getattr(self.config, "free_state", True))
        self._layers.all_trainable()  # the optimizer is built over every layer; state appears only when active
        self.prepare(ctx, layers)
        self._dirty = True

    # --- running -----------------------------------------------------------------------------------
    def on_step_start(self, ctx: Context) -> None:
        assert self._layers is not None, "apply() must run before the first step"
        k = ctx.step // self.config.interval
        if k != self.round or self._dirty:
            if k != self.round:
                self.round = k
                self._chosen = self.select(k, len(self._layers.layers))
            self._layers.switch(self._chosen, ctx.optimizer)
            self._dirty = False

    def on_step_end(self, ctx: Context, metrics: dict[str, float]) -> None:
        if self._layers is not None:
            self._layers.verify(ctx.optimizer, self.name)
        if ctx.step % self.config.interval == 0 and self._layers is not None:
            metrics[f"{self.name}_layers"] = ",".join(map(str, self._layers.active or []))

    @property
    def active(self) -> list[int]:
        return list(self._layers.active or []) if self._layers is not None else []

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "chosen": list(getattr(self, "_chosen", []) or []), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.round = state.get("round")
            self._chosen = list(state.get("chosen", []))
            self.seed = state.get("seed", self.seed)
            self._dirty = True

    # --- estimating --------------------------------------------------------------------------------
    def transform_spec(self, spec: RunSpec) -> RunSpec:
        n_layers = len({layer_index(p.name) for p in spec.model.params} - {None})
        worst = largest_layers(spec.model.params, min(self.n_active(n_layers), n_layers))

        def trains(p: ParamInfo) -> bool:
            i = layer_index(p.name)
            return p.trainable and (i in worst if i is not None else self._trains_outside(p.name))

        return mark_trainable(spec, trains)
