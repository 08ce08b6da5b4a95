"""PEQA — Kim, Lee, Kim, Kwon, Yoo, Kim & Lee 2023, "Memory-Efficient Fine-Tuning of Compressed Large Language
Models via sub-4-bit Integer Quantization" (NeurIPS 2023).

Every linear weight is quantized (round-to-nearest, asymmetric, 3 or 4 bits, per output channel by default) as
W ≈ s ⊙ (W̄ − z); the integer codes W̄ and zero points z are frozen and only the scales s (one per output channel,
or per group) train. Trainable parameters are out_features per layer, so gradients and optimizer state are tiny
and the fine-tuned model stays quantized. Codes are stored in 4-bit nibbles for both 3 and 4 bits (3-bit codes
are not bit-packed: 0.5 bytes per parameter either way).

Recipe: `adapter: {name: peqa, bits: 4, group_size: 0}`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory import estimate as est
from memfit.memory.estimate import parameter_bytes
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context, Technique, TechniqueConfig
from memfit.weights.base import quantize_spec
from memfit.weights.format import WeightFormat, get_format
from memfit.weights.linear import DEFAULT_SKIP, quantizable_linears, quantize_model, quantized_modules


class PEQAConfig(TechniqueConfig):
    bits: Literal[3, 4] = 4
    group_size: int = Field(0, ge=0, description="0 = one scale per output channel (the paper's default)")
    skip: tuple[str, ...] = DEFAULT_SKIP
    target: tuple[str, ...] | None = None


class PEQA(Technique):
    name = "peqa"
    slot = "adapter"
    needs_gradients = True
    Config = PEQAConfig

    @property
    def format(self) -> WeightFormat:
        return get_format(f"int{self.config.bits}")

    def check(self, ctx: Context) -> None:
        if any(True for _ in quantized_modules(ctx.model)):
            raise ConfigError("PEQA quantizes the model itself; remove the 'weights' technique from the recipe")
        if not quantizable_linears(ctx.model, self.config.skip, self.config.target):
            raise ConfigError("PEQA found no nn.Linear layer to quantize (check 'skip' / 'target')")

    def apply(self, ctx: Context) -> None:
        quantize_model(ctx.model, self.format, self.config.group_size, self.config.skip, self.config.target)
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        for q in quantized_modules(ctx.model).values():
            q.make_scale_trainable()

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        frozen = spec.with_(model=_freeze(spec.model))
        return quantize_spec(frozen, self.format, self.config.group_size, self.config.skip, self.config.target,
                             trainable_scale=True)

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        return base.with_(parameters=parameter_bytes(spec))

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
        """Plain backprop's phases, and the first backward of the top block's MLP (its output projection): the
        scales' gradient is reduced from a dense fp32 ∂L/∂W (`weights.linear.padded_weight_grad`), alive with the
        unit codes and their product (3 weight-sized fp32 tensors) beside the projection's output and input
        gradients."""
        phases = est.backprop_phases(spec, breakdown)
        m = spec.model
        if not m.n_layers or not any(p.trainable for p in m.params):
            return phases
        mlp_tmp, _ = est.block_backward_temporaries(spec)
        before = phases["top_block_mlp"] + est.block_components(spec, m.n_layers - 1)["norms"] // 2 - mlp_tmp
        grads = spec.tokens * (m.hidden + m.intermediate) * est.dtypes(spec).compute
        phases["top_block_mlp_scales"] = before + grads + 3 * m.hidden * m.intermediate * 4
        return phases


def _freeze(model):
    from dataclasses import replace

    return replace(model, params=tuple(replace(p, trainable=False) for p in model.params))
