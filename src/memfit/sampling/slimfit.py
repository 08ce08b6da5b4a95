"""SlimFit — Ardakani, Haan, Tan, Popovici, Cheung, Wang, Gross 2023, "SlimFit: Memory-Efficient Fine-Tuning of
Transformer-based Models Using Training Dynamics".

Layers are frozen by their training dynamics: every `interval` steps (an "epoch" of the inter-epoch distance
freezing rule, IEDF) each transformer layer that trained in the round just finished gets its distance — how far its
weights moved, ‖W_end − W_start‖ / ‖W_start‖ — and for the next round the `freeze_ratio` fraction of layers with
the smallest distances is frozen; a layer that has not trained yet counts as infinitely far (it is tried before
any measured layer is kept), so the first rounds visit every layer. Embeddings, norms outside the layers and the
head keep training. A frozen layer saves for backward only what the gradient of its *input* needs (its linear
layers keep no input), and SlimFit quantizes and prunes those saved activations: here to `bits` per element
(per-channel scale and offset) and, with `keep` < 1, the attention probabilities (softmax outputs, mostly near
zero) to the `keep` fraction of their entries of largest magnitude (a bitmap of their places + their codes; zeros
elsewhere in backward) — both in `activations/_common.CompressHooks`; the trained layers keep exact activations.
Pruning needs a kernel that saves the probabilities (eager attention, or SDPA's math kernel — BERT with attention
dropout on CPU); under SDPA's fused kernel there are none and `keep` changes nothing.

Distances are measured on a fixed random sample of `sample` weights per layer (the squared Frobenius distance
estimated without bias up to the scale both terms share), so the rule holds no copy of the weights. Deactivated
layers lose gradients and optimizer state (`sampling/layers.py`).

    adapter: {name: slimfit, freeze_ratio: 0.5, interval: 50, bits: 8, keep: 0.5}
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Any

import torch
from pydantic import Field

from memfit.activations import _common as c
from memfit.activations import layout as lay
from memfit.compat import fail
from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec
from memfit.sampling.layers import LayerSampler, LayerSamplerConfig, seeded_generator
from memfit.techniques.base import Context


class SlimFitConfig(LayerSamplerConfig):
    interval: int = Field(50, ge=1, description="steps per round (the 'epoch' of the inter-epoch distance)")
    layers: int = Field(1, ge=1, description="unused: the number of trained layers follows freeze_ratio")
    freeze_ratio: float = Field(0.5, ge=0, lt=1, description="fraction of transformer layers frozen per round")
    bits: int | None = Field(8, description="bits per saved activation of frozen layers (8 or 4; null: exact)")
    keep: float = Field(1.0, gt=0, le=1, description="fraction of the attention probabilities frozen layers save "
                        "that is kept, by magnitude (the rest pruned to zero; 1: no pruning)")
    sample: int = Field(4096, ge=16, description="weights per layer sampled to measure its distance")
    min_numel: int = Field(1024, ge=1, description="smaller saved tensors of frozen layers are kept as they are")


class SlimFit(LayerSampler):
    name = "slimfit"
    plan_options = ({},)
    needs_pretrained = True  # freezes layers by how far fine-tuning moves them
    conflicts = ("checkpointing", "offload", "mesa", "s2a", "streambp", "wta_crs")  # re-store the same tensors
    Config = SlimFitConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        if self.config.bits not in (None, 4, 8):
            raise ConfigError(f"adapter 'slimfit': bits must be 8, 4 or null, got {self.config.bits}")
        if self.config.keep < 1 and self.config.bits is None:
            raise ConfigError("adapter 'slimfit': pruning (keep < 1) stores the kept entries' codes; set bits to 8 "
                              "or 4")
        self.distance: dict[int, float] = {}
        self._start: dict[int, torch.Tensor] = {}
        self._started: int | None = None
        self._made: list[c.CompressHooks] = []
        self.packed_bytes = 0

    def n_active(self, n_layers: int) -> int:
        return max(1, n_layers - int(round(self.config.freeze_ratio * n_layers)))

    # --- the rule ------------------------------------------------------------------------------------
    def _sample(self, i: int) -> torch.Tensor:
        params = [p for p in self._layers.layers[i] if p.dim() >= 2]
        gen = seeded_generator(self.seed, 7919 * (i + 1))
        picks = []
        for p in params:
            n = min(p.numel(), max(1, self.config.sample // len(params)))
            idx = torch.randint(0, p.numel(), (n,), generator=gen)
            picks.append(p.detach().reshape(-1)[idx.to(p.device)].float())
        return torch.cat(picks)

    def select(self, k: int, n_layers: int) -> list[int]:
        """Layers to train in round k: the farthest-moving ones (unmeasured first, then by distance; ties by a
        seeded shuffle)."""
        order = torch.randperm(n_layers, generator=seeded_generator(self.seed, k)).tolist()
        ranked = sorted(order, key=lambda i: -self.distance.get(i, math.inf))
        return sorted(ranked[:self.n_active(n_layers)])

    def on_step_start(self, ctx: Context) -> None:
        k = ctx.step // self.config.interval
        if k != self.round and self.round is not None:  # a round ended: measure the layers that trained in it
            for i, start in self._start.items():
                now = self._sample(i)
                self.distance[i] = float((now - start).norm() / start.norm().clamp_min(1e-12))
        super().on_step_start(ctx)
        if k != self._started:
            self._start = {i: self._sample(i) for i in self.active}
            self._started = k

    # --- frozen layers' saved activations --------------------------------------------------------------
    def apply(self, ctx: Context) -> None:
        super().apply(ctx)
        if self.config.bits is None:
            return
        for i, layer in enumerate(c.decoder_layers(ctx.model)):
            c.wrap_forward(layer, "slimfit", lambda i=i, layer=layer: self._context(i, layer))

    def _context(self, i: int, layer) -> contextlib.AbstractContextManager:
        if self._layers is None or self._layers.active is None or i in self._layers.active:
            return contextlib.nullcontext()
        hooks = c.CompressHooks(self.config.bits, c.param_storages(layer), self.config.min_numel, self.config.keep)
        self._made.append(hooks)
        return hooks

    def on_step_end(self, ctx: Context, metrics: dict[str, float]) -> None:
        super().on_step_end(ctx, metrics)
        self.packed_bytes = sum(h.packed_bytes for h in self._made)
        if self.config.keep < 1 and any(h.original_bytes for h in self._made) and not any(h.pruned for h in self._made):
            raise fail(f"adapter 'slimfit': keep {self.config.keep} pruned nothing in {len(self._made)} frozen-layer "
                       "forwards", "attention probabilities saved as softmax outputs (eager attention or SDPA's "
                       "math kernel)", ("torch", "transformers"))
        self._made = []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "distance": {str(k): v for k, v in self.distance.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.distance = {int(k): float(v) for k, v in (state or {}).get("distance", {}).items()}

    # --- its memory story ------------------------------------------------------------------------------
    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if ctx.spec.model.family not in ("llama", "bert"):
            raise ConfigError(f"adapter 'slimfit' models Llama- and BERT-family blocks, not "
                              f"'{ctx.spec.model.family}' ones")
        if self.config.keep < 1 and lay.parts.attention_kernel(ctx.spec) == "flash":
            raise ConfigError("adapter 'slimfit': keep < 1 prunes the attention probabilities, which SDPA's fused "
                              "kernel does not save; set keep: 1 or load the model with attn_implementation: eager")
        for t in ctx.techniques or []:
            if t.slot == "activations" and t.name not in ("chunked_ce",):
                raise ConfigError(f"adapter 'slimfit' re-stores its frozen layers' saved activations itself; it "
                                  f"cannot be combined with activations '{t.name}' — remove one of them")

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        spec = super().transform_spec(spec)
        return spec.with_(extra={**spec.extra, lay.RECORD_KEY: (*spec.extra.get(lay.RECORD_KEY, ()), self)})

    def shape_layout(self, spec: RunSpec, layout: lay.ActivationLayout) -> lay.ActivationLayout:
        """`freeze_ratio` of the layers are frozen: they keep their saved tensors minus their linear layers'
        inputs, at `bits` per element and pruned to `keep` (packed while their forward runs, unpacked for their
        backward)."""
        n = spec.model.n_layers
        frozen = n - self.n_active(n)
        saved = layout.layer - lay.linear_inputs_bytes(spec) - frozen_norm_bytes(spec)
        bits = self.config.bits
        probs = lay.softmax_outputs(spec)
        scratch = layout.layer + 2 * spec.tokens * spec.model.intermediate * lay.act_bytes(spec) if bits else 0

        def plan(i: int, p: lay.LayerPlan) -> lay.LayerPlan:
            # which layers freeze changes every round; the estimate places the frozen ones at the top, where
            # packing a layer's tensors in forward meets the most kept bytes below it (the worst placement)
            if i < n - frozen:
                return p
            return replace(p, saved=saved, bits=bits, pack_scratch=scratch, keep=self.config.keep, probs=probs)

        return layout.with_layers(plan)

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        return lay.layout_of(spec).estimate(spec, base)

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
        return lay.layout_of(spec).step_phases(spec, breakdown)


def frozen_norm_bytes(spec: RunSpec) -> int:
    """What a block's norms save only for their weights' gradients: Llama's RMSNorm keeps its normalized input
    for `weight * x` (two norms per block); BERT's LayerNorm saves the same tensors frozen or not."""
    if spec.model.family != "llama":
        return 0
    return 2 * spec.tokens * spec.model.hidden * lay.est.dtypes(spec).residual
