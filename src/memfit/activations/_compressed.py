"""The technique shell shared by Mesa (8-bit) and S2A (4-bit) compressed saved activations."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from memfit.activations import _common as c
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context, Technique, TechniqueConfig


class CompressedConfig(TechniqueConfig):
    min_numel: int = Field(1024, ge=1, description="smaller saved tensors are kept as they are")


class CompressedActivations(Technique):
    """Wraps every decoder layer's forward in `CompressHooks` (the loss head keeps exact saved tensors)."""

    slot = "activations"
    Config = CompressedConfig
    bits: ClassVar[int]

    def apply(self, ctx: Context) -> None:
        for layer in c.decoder_layers(ctx.model):
            params = c.param_storages(layer)
            c.wrap_forward(layer, f"compressed{self.bits}",
                           lambda params=params: c.CompressHooks(self.bits, params, self.config.min_numel))

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        return c.with_extra(spec, saved_bits=self.bits)

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        return base.with_(activations=c.activation_estimate(spec))


def error_bound(x_range: float, bits: int) -> float:
    """Largest absolute error of one dequantized element in a channel whose values span `x_range`."""
    return x_range / (2 * ((1 << bits) - 1))
