"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".

The frozen weight W gets a trainable low-rank update (alpha/r)·B·A, B zero-initialised; implemented by `peft`.
Recipe: `adapter: {name: lora, r: 16, alpha: 32, dropout: 0.0, target: all-linear | [q_proj, v_proj]}`.
"""

from __future__ import annotations

from memfit.adapters.peft_tuner import LoraLike


class LoRA(LoraLike):
    name = "lora"
    plan_options = ({"r": 16},)
    needs_pretrained = True
    plan_lr_scale = 10.0  # on SST-2, LoRA at 1e-3 matched full fine-tuning at 1e-4 (bench fewer-params)
