"""The technique shell shared by Mesa (8-bit) and S2A (4-bit) compressed saved activations."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from pydantic import Field

from memfit.activations import _common as c
from memfit.activations import layout as lay
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context, TechniqueConfig


class CompressedConfig(TechniqueConfig):
    min_numel: int = Field(1024, ge=1, description="smaller saved tensors are kept as they are")


class CompressedActivations(lay.LayoutTechnique):
    """Wraps every decoder layer's forward in `CompressHooks` (the loss head keeps exact saved tensors)."""

    Config = CompressedConfig
    bits: ClassVar[int]

    def apply(self, ctx: Context) -> None:
        for layer in c.decoder_layers(ctx.model):
            params = c.param_storages(layer)
            c.wrap_forward(layer, f"compressed{self.bits}",
                           lambda params=params: c.CompressHooks(self.bits, params, self.config.min_numel))

    def shape_layout(self, spec: RunSpec, layout: lay.ActivationLayout) -> lay.ActivationLayout:
        """Every layer's saved tensors are kept at `bits` and unpacked in full for its backward. While a layer
        runs forward (outside a checkpoint), its full-precision tensors, their packed copies and the quantizer's
        scratch (two of the largest, MLP-wide tensors) are alive together."""
        scratch = layout.layer + 2 * spec.tokens * spec.model.intermediate * lay.act_bytes(spec)
        return layout.with_layers(lambda i, plan: replace(plan, bits=self.bits, pack_scratch=scratch))


def error_bound(x_range: float, bits: int) -> float:
    """Largest absolute error of one dequantized element in a channel whose values span `x_range`."""
    return x_range / (2 * ((1 << bits) - 1))
