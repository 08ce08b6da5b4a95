"""IST — Yao et al. 2024, "Layer-wise Importance Matters: Less Memory for Better Performance in
Parameter-efficient Fine-tuning of Large Language Models" (Importance-aware Sparse Tuning, EMNLP Findings).

LoRA adapters on every layer, but only γ (`layers`) layers' adapters update at a time; which ones is sampled in
proportion to learned layer importance (softmax of scores / `temperature`). Every `update_every` steps the
importance loop probes the current batch without gradients: it suppresses the adapters of a random subset of
layers and scores each suppressed layer by the relative loss increase (a layer whose adapter matters hurts
more when silenced), folded into an exponential moving average (`beta`). This is our reading of the paper's
"response suppression"; the authors' code was not available to compare with. Inactive adapters lose gradients
and optimizer state like the other samplers. Recipe: `adapter: {name: ist, r: 8, layers: 2, interval: 10}`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from memfit.adapters.lora import LoRA
from memfit.adapters.peft_tuner import LoraLikeConfig
from memfit.errors import ConfigError
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.sampling.layers import (
    ActiveLayers,
    group_by_layer,
    largest_layers,
    layer_index,
    mark_trainable,
    seeded_generator,
)
from memfit.techniques.base import Context, ForwardBackward


class ISTConfig(LoraLikeConfig):
    layers: int = Field(2, ge=1, description="layers whose adapters update at a time")
    interval: int = Field(10, ge=1, description="steps between re-sampling the active layers")
    update_every: int = Field(10, ge=1, description="steps between importance updates")
    probes: int = Field(2, ge=1, description="suppressed subsets evaluated per importance update")
    beta: float = Field(0.9, ge=0, lt=1)
    temperature: float = Field(0.1, gt=0)


class IST(LoRA):
    name = "ist"
    Config = ISTConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.scores: list[float] = []
        self.round: int | None = None
        self._chosen: list[int] = []
        self._probed_step = -1
        self._dirty = True
        self.seed = 0

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        n = len({layer_index(n) for n, _ in ctx.model.named_parameters()} - {None})
        if self.config.layers > n:
            raise ConfigError(f"adapter 'ist': layers={self.config.layers} but the model has only {n} layers")

    def apply(self, ctx: Context) -> None:
        super().apply(ctx)
        self.seed = ctx.seed
        adapters = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad and ".lora_" in n]
        layers, _ = group_by_layer(adapters)
        self._layers = ActiveLayers({i: [p for _, p in ps] for i, ps in layers.items()})
        self._suppress = {}
        for name, mod in ctx.model.named_modules():
            i = layer_index(name + ".")
            if i is not None and hasattr(mod, "scaling") and hasattr(mod, "lora_A"):
                self._suppress.setdefault(i, []).append(mod)
        unreachable = sorted(set(self._layers.layers) - set(self._suppress))
        if unreachable or not all(isinstance(getattr(m, "scaling", None), dict)
                                  for mods in self._suppress.values() for m in mods):
            from memfit.compat import fail

            raise fail(f"adapter 'ist' cannot silence the LoRA layers of layers {unreachable or 'some'}",
                       "peft LoRA layers with `lora_A` and a `scaling` dict per adapter", ("peft",))
        if not self.scores:
            self.scores = [0.0] * len(self._layers.layers)

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(torch.tensor(self.scores, dtype=torch.float64) / self.config.temperature, 0)

    def on_step_start(self, ctx: Context) -> None:
        k = ctx.step // self.config.interval
        if k != self.round:
            self.round = k
            order = sorted(self._layers.layers)
            picked = torch.multinomial(self.probabilities(), self.config.layers, replacement=False,
                                       generator=seeded_generator(self.seed, k))
            self._chosen = sorted(order[i] for i in picked.tolist())
            self._dirty = True
        if self._dirty:
            self._layers.switch(self._chosen, ctx.optimizer)
            self._dirty = False

    @property
    def active(self) -> list[int]:
        return list(self._layers.active or [])

    # --- importance loop -----------------------------------------------------------------------------
    def update_importance(self, ctx: Context, batch: dict, loss_fn) -> None:
        order = sorted(self._layers.layers)
        with torch.no_grad():
            base = float(loss_fn(ctx.model, batch))
            g = seeded_generator(self.seed + 7919, ctx.step)
            for _ in range(self.config.probes):
                subset = [order[i] for i in torch.randperm(len(order), generator=g)[: self.config.layers].tolist()]
                saved = [(m, dict(m.scaling)) for i in subset for m in self._suppress.get(i, [])]
                for m, _ in saved:
                    for key in m.scaling:
                        m.scaling[key] = 0.0
                try:
                    suppressed = float(loss_fn(ctx.model, batch))
                finally:
                    for m, scaling in saved:
                        m.scaling.update(scaling)
                reward = (suppressed - base) / max(abs(base), 1e-8)
                for i in subset:
                    j = order.index(i)
                    self.scores[j] = self.config.beta * self.scores[j] + (1 - self.config.beta) * reward

    def wrap_forward_backward(self, fb: ForwardBackward, ctx: Context) -> ForwardBackward:
        def forward_backward(model, batch, loss_scale):
            if ctx.step % self.config.update_every == 0 and ctx.step != self._probed_step:
                self._probed_step = ctx.step
                self.update_importance(ctx, batch, ctx.loss_fn)
            return fb(model, batch, loss_scale)

        return forward_backward

    def on_step_end(self, ctx: Context, metrics: dict[str, float]) -> None:
        self._layers.verify(ctx.optimizer, self.name)
        if ctx.step % self.config.interval == 0:
            metrics["ist_layers"] = ",".join(map(str, self.active))

    # --- resume & estimate -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scores": list(self.scores), "round": self.round, "chosen": self._chosen, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scores = list(state["scores"])
            self.round, self._chosen, self.seed = state["round"], list(state["chosen"]), state["seed"]
            self._dirty = True

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        spec = super().transform_spec(spec)
        adapters = [p for p in spec.model.params if ".lora_" in p.name and p.trainable]
        worst = largest_layers(adapters, self.config.layers)

        def trains(p: ParamInfo) -> bool:
            i = layer_index(p.name)
            return p.trainable and (".lora_" not in p.name or i is None or i in worst)

        return mark_trainable(spec, trains)
