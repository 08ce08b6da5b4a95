"""The technique shell shared by Mesa (8-bit) and S2A (4-bit) compressed saved activations."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from memfit.activations import _common as c
from memfit.activations import layout as lay
from memfit.compat import count_training_calls, fail
from memfit.memory.arch import family_of
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Batch, Context, ForwardBackward, TechniqueConfig


class CompressedConfig(TechniqueConfig):
    min_numel: int = Field(1024, ge=1, description="smaller saved tensors are kept as they are")


class CompressedActivations(lay.LayoutTechnique):
    """Wraps every decoder layer's forward in `CompressHooks` (the loss head keeps exact saved tensors)."""

    Config = CompressedConfig
    bits: ClassVar[int]

    def __init__(self, config: TechniqueConfig | None = None) -> None:
        super().__init__(config)
        self._made: list[c.CompressHooks] = []  # the hooks of the current forward-backward's layer forwards

    def apply(self, ctx: Context) -> None:
        def make(params: set[int]) -> c.CompressHooks:
            hooks = c.CompressHooks(self.bits, params, self.config.min_numel)
            self._made.append(hooks)
            return hooks

        self._layers = list(c.decoder_layers(ctx.model))
        for layer in self._layers:
            c.wrap_forward(layer, f"compressed{self.bits}", lambda params=c.param_storages(layer): make(params))
            count_training_calls(layer)

    def wrap_forward_backward(self, fb: ForwardBackward, ctx: Context) -> ForwardBackward:
        def forward_backward(model: nn.Module, batch: Batch, loss_scale: float) -> torch.Tensor:
            self._made.clear()
            layers = getattr(self, "_layers", [])
            for layer in layers:
                layer._memfit_training_calls = 0
            loss = fb(model, batch, loss_scale)
            ran = sum(layer._memfit_training_calls for layer in layers)
            if ran and not any(h.original_bytes for h in self._made):
                raise fail(f"{self.name}: {ran} training calls of decoder layers compressed no saved activation "
                           f"({len(self._made)} ran under the saved-tensor hooks)",
                           "decoder layers called through their `forward` attribute to save tensors for backward "
                           "through torch.autograd.graph.saved_tensors_hooks", ("torch", "transformers"))
            self._made.clear()
            return loss

        return forward_backward

    def shape_layout(self, spec: RunSpec, layout: lay.ActivationLayout) -> lay.ActivationLayout:
        """Every layer's saved tensors are kept at `bits` and unpacked in full for its backward. While a layer
        runs forward (outside a checkpoint), its full-precision tensors, their packed copies and the quantizer's
        fp32 scratch (`layout.quantizer_scratch`) are alive together. Under autocast the weight casts autograd
        saves pass through the hooks too and are kept packed. Until the loss, the forward's KV cache keeps the
        keys and values in full (`Family.cache_saved`), and the model's forward the first block's input."""
        scratch = layout.layer + lay.quantizer_scratch(spec)
        cache = family_of(spec.model).cache_saved(spec)
        return layout.with_layers(lambda i, plan: replace(
            plan, bits=self.bits, pack_scratch=scratch, casts=layout.layer_casts,
            forward_only=cache + (lay.layer_input_bytes(spec) if i == 0 else 0)))


def error_bound(x_range: float, bits: int) -> float:
    """Largest absolute error of one dequantized element in a channel whose values span `x_range`."""
    return x_range / (2 * ((1 << bits) - 1))
