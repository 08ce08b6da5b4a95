"""SketchTune — Zhang, Yao, Zhang et al. 2025, "Sketch to Adapt: Fine-Tunable Sketches for Efficient LLM
Adaptation" (ICML 2025).

Each linear weight is compressed into a *sketch*: every row (or group of `group_size` input columns of a row)
keeps a small table of 2^`bits` values, and each weight stores only the index of its value in that table,
W[o, j] = sketch[o, g(j), index[o, j]]. The indices are frozen (packed 4-bit codes); the sketch tables are the
trainable parameters, so fine-tuning adapts the compressed model itself — no adapter to merge, and the base the
run holds is the compressed one (about `bits`/16 of bf16).

`SketchFormat` is a `WeightFormat` (the storage is a type, `format.py`): `encode` fits each group's table by 1-D
k-means (Lloyd) with its two end values pinned to the group's minimum and maximum, so every weight lies inside its
table's range and `error_bound` — half the widest gap between neighbouring table values — holds for the encoded
weight. The gradient of a table entry is the sum of ∂L/∂W over the weights that point at it (`SketchFormat.scale_grad`),
computed in backward from the saved input: a dense (out, in) fp32 gradient, the decoded weight and the int64
indices of one layer (16 bytes per weight) exist only transiently.
Departure from the paper: its sketches are fitted with a data-aware (second-order, calibration-set) objective;
memfit fits them to the weights alone (data-free), so the starting accuracy is that of plain k-means coding.
Recipe: `adapter: {name: sketchtune, bits: 4, group_size: 0}`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.estimate import backprop_phases, fixed_bytes, parameter_bytes
from memfit.memory.spec import RunSpec
from memfit.techniques.base import AdapterTechnique, Context, TechniqueConfig
from memfit.weights.base import quantize_spec
from memfit.weights.format import StorageLayout, WeightFormat, grouped, pack_nibbles, register, unpack_nibbles
from memfit.weights.linear import DEFAULT_SKIP, QuantLinear, quantizable_linears, set_submodule

LLOYD_ITERATIONS = 10


class SketchFormat(WeightFormat):
    """Per-group value tables (fp32, trainable) + 4-bit indices into them (2, 3 or 4 bits used)."""

    scale_name = "sketch"

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.name = f"sketch{bits}"
        self.levels = 2 ** bits

    def effective_group(self, in_features: int, group_size: int | None) -> int:
        g = group_size or in_features
        if g % 2:
            raise ConfigError(f"sketch: group_size {g} must be even (two 4-bit indices per byte)")
        return g

    def layout(self, out: int, inp: int, group_size: int | None) -> StorageLayout:
        g = self.effective_group(inp, group_size)
        padded = -(-inp // g) * g
        return StorageLayout(g, padded, {"index": ((out, padded // 2), torch.uint8),
                                         "sketch": ((out, padded // g, self.levels), torch.float32)})

    def encode(self, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        wg = grouped(w.float(), group_size)  # (out, G, g)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        table = lo + (hi - lo) * torch.linspace(0, 1, self.levels, device=w.device)  # (out, G, K)
        for _ in range(LLOYD_ITERATIONS):
            index = (wg[..., None] - table[..., None, :]).abs().argmin(-1)  # (out, G, g)
            sums = torch.zeros_like(table).scatter_add_(-1, index, wg)
            counts = torch.zeros_like(table).scatter_add_(-1, index, torch.ones_like(wg))
            table = torch.where(counts > 0, sums / counts.clamp_min(1), table)
            table[..., :1], table[..., -1:] = lo, hi  # pinned ends: every weight stays inside the table's range
            table = table.sort(-1).values
        index = (wg[..., None] - table[..., None, :]).abs().argmin(-1)
        return {"index": pack_nibbles(index.reshape(w.shape[0], -1)), "sketch": table}

    def indices(self, t: dict[str, torch.Tensor], out: int) -> torch.Tensor:
        """(out, G, g) int64 indices into each group's table."""
        sketch = t["sketch"]
        return unpack_nibbles(t["index"]).reshape(out, sketch.shape[1], -1).long()

    def decode(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        w = torch.gather(t["sketch"].float(), -1, self.indices(t, out))
        return w.reshape(out, -1)[:, :inp]

    def scale_grad(self, grad_w: torch.Tensor, t: dict[str, torch.Tensor], out: int) -> torch.Tensor:
        """∂L/∂table entry: Σ ∂L/∂W over the weights that point at it."""
        index = self.indices(t, out)
        return torch.zeros_like(t["sketch"]).scatter_add_(-1, index, grad_w.reshape(index.shape))

    def error_bound(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        table = t["sketch"].float()
        half_gap = (table.diff(dim=-1).amax(-1, keepdim=True) / 2).expand(-1, -1, self.indices(t, out).shape[-1])
        return half_gap.reshape(out, -1)[:, :inp] * (1 + 1e-6) + 1e-12


SKETCH_FORMATS = {bits: register(SketchFormat(bits)) for bits in (2, 3, 4)}


class SketchLinear(QuantLinear):
    """A `QuantLinear` in a `SketchFormat` whose tables train (`QuantLinear`'s autograd function, the gradient
    from `SketchFormat.scale_grad`)."""


class SketchTuneConfig(TechniqueConfig):
    bits: Literal[2, 3, 4] = 4
    group_size: int = Field(0, ge=0, description="input columns per table (0 = one table per output row)")
    skip: tuple[str, ...] = DEFAULT_SKIP
    target: tuple[str, ...] | None = None


CLS_HEADS = ("classifier", "score")


class SketchTune(AdapterTechnique):
    name = "sketchtune"
    Config = SketchTuneConfig

    @property
    def format(self) -> SketchFormat:
        return SKETCH_FORMATS[self.config.bits]

    @property
    def skip(self) -> tuple[str, ...]:
        """Output heads stay dense: a classification head is new and trains in full."""
        return tuple(self.config.skip) + CLS_HEADS

    def check(self, ctx: Context) -> None:
        if ctx.has_quantized_base():
            raise ConfigError("adapter sketchtune compresses the model itself into trainable sketches; remove the "
                              "'weights' technique from the recipe")
        linears = quantizable_linears(ctx.model, self.skip, self.config.target)
        if not linears:
            raise ConfigError("adapter sketchtune found no nn.Linear layer to sketch (check 'skip' / 'target')")
        for _, lin in linears:
            self.format.effective_group(lin.in_features, self.config.group_size)

    def apply(self, ctx: Context) -> None:
        linears = quantizable_linears(ctx.model, self.skip, self.config.target)
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        for name, lin in linears:
            layer = SketchLinear.from_linear(lin, self.format, self.config.group_size)
            layer.make_scale_trainable()
            set_submodule(ctx.model, name, layer)
        if ctx.spec.task != "causal_lm":
            for head in CLS_HEADS:
                for p in getattr(ctx.model, head).parameters() if hasattr(ctx.model, head) else ():
                    p.requires_grad_(True)

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        from dataclasses import replace

        heads = CLS_HEADS if spec.task != "causal_lm" else ()
        frozen = replace(spec.model, params=tuple(
            replace(p, trainable=any(h in p.name.split(".") for h in heads)) for p in spec.model.params))
        return quantize_spec(spec.with_(model=frozen), self.format, self.config.group_size, self.skip,
                             self.config.target, trainable_scale=True)

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """Parameters: the stored indices and tables (exact). Temporaries: a sketched layer's backward holds its
        decoded weight, the dense fp32 weight gradient and the int64 indices (16 bytes per weight) at once, on top
        of plain backprop's block transients."""
        largest = max((p.shape[0] * p.shape[1] * 2 for p in spec.model.params if p.name.endswith(".index")),
                      default=0)
        return base.with_(parameters=parameter_bytes(spec), temporaries=base.temporaries + 16 * largest)

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
        """Plain backprop's phases plus a sketched layer's backward with every activation still held (the
        top layer's, conservatively): weights, state, activations, gradients and the temporaries above."""
        phases = backprop_phases(spec, breakdown)
        phases["sketch_backward"] = (fixed_bytes(breakdown) + breakdown.activations + breakdown.gradients
                                     + breakdown.temporaries)
        return phases
