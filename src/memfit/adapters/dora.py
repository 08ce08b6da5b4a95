"""DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation".

Splits each target weight into a magnitude vector (trainable, one per output channel) and a direction updated by
LoRA; implemented by `peft` (`LoraConfig(use_dora=True)`). Same recipe options as `lora`.
"""

from __future__ import annotations

from memfit.adapters.lora import LoRA
from memfit.memory.spec import RunSpec


class DoRA(LoRA):
    name = "dora"
    use_dora = True

    def extra_activation_bytes(self, spec: RunSpec, targets: list[str]) -> int:
        # on top of LoRA, peft's DoRA forward saves two (tokens x out-features) tensors per wrapped layer for the
        # magnitude rescale `(m/|W'| - 1)·xW + m/|W'|·lora(x)`: the base output x·W and the LoRA branch's output
        # (measured on MiniLM-L6, batch 16 x 64 tokens: 1.00x the LoRA estimate plus these two)
        lora = super().extra_activation_bytes(spec, targets)
        weights = {p.name: p for p in spec.model.params}
        out_features = 0
        for t in targets:
            for key in (f"base_model.model.{t}.base_layer.weight", f"{t}.weight"):
                if key in weights:
                    out_features += weights[key].shape[0]
                    break
        return lora + 2 * spec.tokens * out_features * 4
