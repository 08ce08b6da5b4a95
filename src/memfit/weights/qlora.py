"""QLoRA — Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs".

The frozen base is stored in NF4 with double-quantized constants (`memfit.weights.nf4`, ≈0.516 bytes per
quantized parameter) and LoRA adapters train on top, on CPU as well as CUDA. The LoRA layers are peft's own
`lora.Linear`, registered for memfit's `QuantLinear` through peft's custom-module mapping, so everything peft
does with LoRA (rank, alpha, dropout, rsLoRA, saving adapters) applies unchanged; `QuantLinear`'s autograd
function saves only the packed base weight for backward. Paged optimizers (the paper's third piece) are a CUDA
unified-memory feature and are not reproduced.

Recipe: `adapter: {name: qlora, r: 16, alpha: 32, target: all-linear, group_size: 64}`; `format: int8 | int4`
puts the same LoRA over memfit's other weight formats (the paper's NF4 is the default).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memfit.adapters.peft_tuner import LoraLike, LoraLikeConfig
from memfit.compat import fail
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.weights.base import quantize_spec
from memfit.weights.format import WeightFormat, get_format
from memfit.weights.linear import QuantLinear, quantize_model


class QLoRAConfig(LoraLikeConfig):
    format: Literal["nf4", "int4", "int8"] = Field("nf4", description="base weight format (QLoRA: nf4)")
    group_size: int | None = Field(None, gt=0, description="block size (default: 64; int8 is per channel)")


def _lora_layer_for_quant():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class QuantLoraLinear(LoraLinear):
        """peft's LoRA linear over a `QuantLinear` base; merging would need re-quantization, so it refuses."""

        def merge(self, *args, **kwargs) -> None:
            raise NotImplementedError("merging LoRA into an NF4 base would re-quantize it; keep the adapter separate")

    return QuantLoraLinear


class QLoRA(LoraLike):
    name = "qlora"
    plan_options = ({"r": 16},)
    needs_pretrained = True
    plan_lr_scale = 10.0
    Config = QLoRAConfig

    @property
    def format(self) -> WeightFormat:
        return get_format(self.config.format)

    def peft_config(self, target_modules, task_type, save):
        config = super().peft_config(target_modules, task_type, save)
        register = getattr(config, "_register_custom_module", None)  # peft's (private) custom-module mapping
        if not callable(register):
            raise fail("qlora cannot register memfit's quantized layer with peft",
                       "peft.LoraConfig._register_custom_module", ("peft",))
        register({QuantLinear: _lora_layer_for_quant()})
        return config

    def check_wrapped(self, model, targets) -> None:
        """As every LoRA tuner, and each LoRA layer sits over a `QuantLinear` (the custom mapping took effect)."""
        super().check_wrapped(model, targets)
        dense = [n for n, m in model.named_modules() if hasattr(m, "base_layer")
                 and not hasattr(m.base_layer, "base_layer") and not isinstance(m.base_layer, QuantLinear)]
        if dense:
            raise fail(f"qlora: peft wrapped {dense[0]} but its base is not memfit's QuantLinear",
                       "peft to wrap the quantized layers through LoraConfig's custom-module mapping", ("peft",))

    def check(self, ctx: Context) -> None:
        from memfit.errors import ConfigError

        if ctx.has_quantized_base():
            raise ConfigError(f"qlora quantizes its base itself (format: {self.format.name}); remove the 'weights' technique "
                              "from the recipe")
        super().check(ctx)

    def apply(self, ctx: Context) -> None:
        from memfit.memory.spec import model_shape

        targets = self._targets(model_shape(ctx.model).params)
        quantize_model(ctx.model, self.format, self.config.group_size, skip=(), target=targets)
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        super().apply(ctx)

    def _targets(self, params):
        # after quantization the targets are QuantLinears whose weight is `qweight`: recover the dense names
        from memfit.memory.spec import ParamInfo

        dense = [ParamInfo(p.name[: -len("qweight")] + "weight", (p.shape[0], 2), p.bytes_per_element, False)
                 if p.name.endswith(".qweight") else p for p in params]
        return super()._targets(tuple(dense))

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        adapted = super().transform_spec(spec)  # peft's names and adapter parameters, on the dense shapes
        targets = set(adapted.extra.get("adapter_targets", []))
        prefix = "base_model.model."
        names = tuple(prefix + t + ".base_layer" for t in targets)
        return quantize_spec(adapted, self.format, self.config.group_size, skip=(), target=names,
                             only_suffix=".base_layer.weight")
