"""SHERL — Diao, Wan, Wu, Ma, Zhang & Lu 2024, "SHERL: Synthesizing High Accuracy and Efficient Memory for
Resource-Limited Transfer Learning" (ECCV 2024).

Two routes over a backbone of N layers, split at `N - late`:

- **early route** (frozen, no graph): the outputs h_1..h_E of the first E = N - `late` layers are tapped under
  no gradient and consolidated by an *anti-redundancy* operation: per token, layer i's redundancy is its mean
  cosine similarity to the other early layers, and the layers are merged with weights softmax((1 - redundancy_i)
  / T + b_i) (b_i learned, zero-initialised), so layers that repeat the others count less. The merged feature
  goes through a bottleneck adapter (down, GELU, zero-initialised up: training starts from the backbone) and is
  added to the input of the first late layer;
- **late route** (trained): the last `late` pre-trained layers are fine-tuned on that input, then the backbone's
  own head (a classification head trains; a causal LM head only with `train_head: true`).

Only the late layers keep activations for backward; the early layers keep their outputs (what the merge reads)
and nothing inside them, so memory is bounded by a few layers however deep the backbone.
Recipe: `adapter: {name: sherl, late: 1, reduction: 8}`.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memfit.activations._common import decoder_layers
from memfit.adapters.side import (
    SideConfig,
    backbone_head_bytes,
    check_tied_head,
    is_head_param,
    side_param_infos,
    text_config,
    unfreeze_head,
    wants_head,
)
from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.estimate import layer_components
from memfit.memory.spec import RunSpec
from memfit.techniques.base import AdapterTechnique, Context

ROUTE = "sherl_route"
_LAYER = re.compile(r"\.(\d+)\.")
FINAL_NORMS = ("norm", "final_layer_norm", "ln_f", "final_layernorm")


class SHERLConfig(SideConfig):
    late: int = Field(1, ge=1, description="last layers fine-tuned (the late route)")
    temperature: float = Field(0.1, gt=0, description="T of the anti-redundancy weights")


class EarlyRoute(nn.Module):
    """Anti-redundancy merge of the early layers' outputs + the bottleneck adapter (zero-initialised up)."""

    def __init__(self, n_early: int, hidden: int, d: int, temperature: float) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_early))
        self.down = nn.Linear(hidden, d)
        self.up = nn.Linear(d, hidden)
        self.temperature = temperature
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def redundancy(self, states: list[torch.Tensor]) -> torch.Tensor:
        """(E, B, S): each layer's mean cosine similarity to the other early layers, per token."""
        with torch.no_grad():
            unit = F.normalize(torch.stack(states), dim=-1)
            sims = torch.einsum("ibsh,jbsh->ibs", unit, unit) - 1.0  # drop the self-similarity (= 1)
            return sims / max(len(states) - 1, 1)

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        scores = (1.0 - self.redundancy(states)) / self.temperature
        w = torch.softmax(scores + self.bias[:, None, None], 0)
        merged = sum(w[i, ..., None] * h for i, h in enumerate(states))
        return self.up(F.gelu(self.down(merged)))


def split_at(n_layers: int, late: int) -> int:
    if late >= n_layers:
        raise ConfigError(f"adapter sherl: late={late} leaves no early layer of {n_layers}; choose late < {n_layers}")
    return n_layers - late


def final_norm(model: nn.Module) -> list[nn.Parameter]:
    """The decoder's final norm (it belongs to the late route): `norm` / `final_layer_norm` / `ln_f` of the body."""
    body = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    for name in FINAL_NORMS:
        if isinstance(getattr(body, name, None), nn.Module):
            return list(getattr(body, name).parameters())
    return []


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class SHERL(AdapterTechnique):
    name = "sherl"
    Config = SHERLConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._route: EarlyRoute | None = None
        self._states: list[torch.Tensor] = []
        self._fired = 0

    def _build(self, n_layers: int, hidden: int) -> EarlyRoute:
        c = self.config
        return EarlyRoute(split_at(n_layers, c.late), hidden, max(hidden // c.reduction, 4), c.temperature)

    def train_head(self, task: str) -> bool:
        return wants_head(self.config.train_head, task)

    def check(self, ctx: Context) -> None:
        if not hasattr(ctx.model, "config"):
            raise ConfigError("adapter sherl needs a transformers model (with .config)")
        if ctx.has_quantized_base():
            raise ConfigError("adapter sherl fine-tunes the late layers in full precision; remove the 'weights' "
                              "technique (or use adapter: qlora)")
        split_at(len(decoder_layers(ctx.model)), self.config.late)
        check_tied_head(ctx.model, ctx.spec.task, self.train_head(ctx.spec.task), self.name)

    def apply(self, ctx: Context) -> None:
        model = ctx.model
        layers = decoder_layers(model)
        n_early = split_at(len(layers), self.config.late)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers[n_early:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in final_norm(model):
            p.requires_grad_(True)
        if self.train_head(ctx.spec.task):
            unfreeze_head(model, ctx.spec.task)
        route = self._build(len(layers), text_config(model).hidden_size).to(next(model.parameters()).device)
        model.add_module(ROUTE, route)
        self._route = route
        for layer in layers[:n_early]:
            layer.register_forward_hook(self._tap)
        layers[n_early].register_forward_pre_hook(self._inject, with_kwargs=True)
        self._n_early = n_early

    def _tap(self, module, args, output) -> None:
        self._states.append((output[0] if isinstance(output, tuple) else output).detach())

    def _inject(self, module, args, kwargs):
        states, self._states = self._states, []
        if len(states) != self._n_early:
            from memfit.compat import fail

            raise fail(f"adapter 'sherl' tapped {len(states)} early layer outputs before layer {self._n_early}",
                       f"the backbone to call its {self._n_early} early layers in order before the late ones",
                       ("transformers",))
        self._fired += 1
        h = _hidden_of(args, kwargs)
        h = h + self._route(states).to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    def on_step_end(self, ctx: Context, metrics: dict[str, float]) -> None:
        if not self._fired:
            from memfit.compat import fail

            raise fail("adapter 'sherl': the early route never reached the late layers during a step",
                       "a forward pre-hook on the first late layer to fire", ("torch", "transformers"))

    # --- estimating ---------------------------------------------------------------------------------
    def transform_spec(self, spec: RunSpec) -> RunSpec:
        m = spec.model
        n_early = split_at(m.n_layers, self.config.late)
        train_head = self.train_head(spec.task)

        def trains(name: str) -> bool:
            idx = _LAYER.search(name)
            if idx and int(idx.group(1)) >= n_early and "embed" not in name:
                return True
            if not idx and len(name.split(".")) >= 2 and name.split(".")[-2] in FINAL_NORMS:
                return True
            return train_head and is_head_param(name, spec.task)

        params = tuple(replace(p, trainable=trains(p.name)) for p in m.params)
        with torch.device("meta"):
            route = side_param_infos(self._build(m.n_layers, m.hidden), ROUTE + ".")
        return spec.with_(model=replace(m, params=params + tuple(route)))

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """Activations: the early outputs the merge reads and its weights, the adapter's inputs (merged, GELU
        in, up in), the late layers as plain backprop keeps them, the backbone's head without its embeddings."""
        m, t, b = spec.model, spec.tokens, 4
        n_early = split_at(m.n_layers, self.config.late)
        d = max(m.hidden // self.config.reduction, 4)
        early = n_early * t * m.hidden * b + n_early * t * b + t * m.hidden * b + 2 * t * d * b
        late = self.config.late * sum(layer_components(spec).values())
        kept = backbone_head_bytes(spec, self.train_head(spec.task))
        return base.with_(activations=early + late + kept)
