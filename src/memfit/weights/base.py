"""The `weights` slot's shared technique: quantize every linear layer to one format, estimate its bytes exactly.

A format file (int8.py, int4.py, nf4.py) defines its `WeightFormat` and a `WeightQuantTechnique` subclass that
names it; AWQ (awq.py) chooses an input scale per layer over the int3/int4 formats. The estimate asks the format
which tensors it stores, so it is exact for any format.
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.estimate import parameter_bytes
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.techniques.base import Context, Technique, TechniqueConfig
from memfit.weights.embedding import quantize_embeddings
from memfit.weights.format import WeightFormat
from memfit.weights.linear import DEFAULT_SKIP, matches, quantizable_linears, quantize_model

EMBEDDING_NAMES = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")


class WeightQuantConfig(TechniqueConfig):
    group_size: int | None = Field(None, ge=0)  # None = the format's default; 0 = one group per output row
    skip: tuple[str, ...] = DEFAULT_SKIP  # module names / name parts left in full precision
    target: tuple[str, ...] | None = None  # only these modules (default: every nn.Linear not skipped)
    embeddings: bool = False  # also store the embedding tables and the output layer in the format (embedding.py)


def quantized_param_infos(p: ParamInfo, fmt: WeightFormat, group_size: int | None, awq: bool = False,
                          trainable_scale: bool = False) -> list[ParamInfo]:
    """The ParamInfos a `QuantLinear` stores in place of the dense weight `p` ((out, in), or a `Conv1D`'s (in, out))."""
    out, inp = p.linear_shape
    prefix = p.name[: -len("weight")]
    infos = []
    for name, (shape, dtype) in fmt.layout(out, inp, group_size).tensors.items():
        trainable = trainable_scale and name == fmt.scale_name
        infos.append(ParamInfo(prefix + name, tuple(shape), 4 if trainable else dtype.itemsize, trainable,
                               quantized=True))
    if awq:
        infos.append(ParamInfo(prefix + "in_scale", (inp,), 4, False, quantized=True))
    return infos


def is_linear_weight(p: ParamInfo, skip: tuple[str, ...], target: tuple[str, ...] | None,
                     only_suffix: str = ".weight") -> bool:
    """Shape-level guess of which parameters `quantize_model` replaces (estimates have no module types)."""
    if len(p.shape) != 2 or not p.name.endswith(only_suffix):
        return False
    module = p.name[: -len(".weight")]
    if any(e in module.split(".")[-1] for e in EMBEDDING_NAMES) or matches(module, skip):
        return False
    return target is None or module in target or matches(module, target)


HEAD_NAMES = ("lm_head", "embed_out")
"""Output layers `quantize_embeddings` replaces (transformers' `get_output_embeddings`), by name for estimates."""


def is_embedding_weight(p: ParamInfo) -> bool:
    """Shape-level guess of the tables and output layer `quantize_embeddings` replaces."""
    if len(p.shape) != 2 or not p.name.endswith(".weight"):
        return False
    module = p.name[: -len(".weight")]
    return any(e in module.split(".")[-1] for e in EMBEDDING_NAMES) or matches(module, HEAD_NAMES)


def quantize_spec(spec: RunSpec, fmt: WeightFormat, group_size: int | None, skip: tuple[str, ...],
                  target: tuple[str, ...] | None, awq: bool = False, trainable_scale: bool = False,
                  only_suffix: str = ".weight", embeddings: bool = False) -> RunSpec:
    params: list[ParamInfo] = []
    for p in spec.model.params:
        if embeddings and is_embedding_weight(p):
            params.extend(quantized_param_infos(p, fmt, group_size))
        elif is_linear_weight(p, skip, target, only_suffix):
            params.extend(quantized_param_infos(p, fmt, group_size, awq, trainable_scale))
        else:
            params.append(p)
    return spec.with_(model=replace(spec.model, params=tuple(params)))


class WeightQuantTechnique(Technique):
    """Quantize the model's linear layers to `format` (frozen); the estimate counts the stored bytes exactly."""

    slot = "weights"
    format: WeightFormat
    Config = WeightQuantConfig

    def check(self, ctx: Context) -> None:
        if not quantizable_linears(ctx.model, self.config.skip, self.config.target):
            raise ConfigError(f"weights '{self.name}': the model has no nn.Linear layer to quantize "
                              "(check 'skip' / 'target')")
        self.format.effective_group(2**30, self.config.group_size)

    def apply(self, ctx: Context) -> None:
        quantize_model(ctx.model, self.format, self.config.group_size, self.config.skip, self.config.target)
        self.apply_embeddings(ctx)

    def apply_embeddings(self, ctx: Context) -> None:
        """With `embeddings: true`, the embedding tables and the output layer in the same format."""
        if self.config.embeddings:
            quantize_embeddings(ctx.model, self.format, self.config.group_size)

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        return quantize_spec(spec, self.format, self.config.group_size, self.config.skip, self.config.target,
                             embeddings=self.config.embeddings)

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        return base.with_(parameters=parameter_bytes(spec))
