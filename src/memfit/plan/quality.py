"""Expected quality and speed of a plan, relative to exact full training with AdamW (1.0), per kind of task.

The priors come from memfit's own measured tables (docs/benchmarks.md): `pretrain` from the optimizer-state
pre-training rows (held-out perplexity, AdamW's ÷ the method's), `finetune` from the fewer-trainable-parameters
rows (SST-2 accuracy and CoNLL entity F1, the method's ÷ full fine-tuning's, averaged) and the zeroth-order rows.
Two rules on top of the numbers:

- an approximation is never expected to beat the exact method it approximates: a measured ratio above 1 (GaLore's
  200-step perplexity beat AdamW's at its paper's larger learning rate) is capped at `APPROX_CAP`;
- exact techniques (layer-wise updates, checkpointing, chunked loss, StreamBP, fp32 / bf16 autocast) are 1.0.

A plan's quality is the product of its techniques'. Speed: tokens/s from the model's FLOPs per token
(`bench/mfu.py`) at a nominal utilisation of the device's matmul peak, divided by each technique's measured
slowdown (`SPEED`, "tok/s vs AdamW" / "vs full FT" columns; CPU, ±25 % contention noise) — a ranking aid, not a
promise.
"""

from __future__ import annotations

APPROX_CAP = 0.99

EXACT = 1.0

# technique name -> expected quality relative to AdamW full training, by task kind
QUALITY: dict[str, dict[str, float]] = {
    # optimizers — pretrain: AdamW ppl 600.0 ÷ method ppl (200 steps, 7.4 M Llama); finetune: same unless measured
    "adamw": {"pretrain": EXACT, "finetune": EXACT},
    "sgd": {"pretrain": 0.70, "finetune": 0.90},  # not in the tables: SGD without Adam's scaling, assumed worse
    "adamw_8bit": {"pretrain": APPROX_CAP, "finetune": APPROX_CAP},  # 594.8: capped
    "adam_mini": {"pretrain": 600.0 / 609.8, "finetune": 600.0 / 609.8},
    "galore": {"pretrain": APPROX_CAP, "finetune": 0.32 / 0.46},  # 442.2: capped; CoNLL F1 at scale 4, 60 steps
    "galore_8bit": {"pretrain": APPROX_CAP, "finetune": 0.32 / 0.46 * APPROX_CAP},
    "apollo": {"pretrain": APPROX_CAP, "finetune": 0.32 / 0.46},  # 531.7: capped; finetune: as GaLore (assumed)
    "apollo_mini": {"pretrain": 600.0 / 786.8, "finetune": 600.0 / 786.8 * 0.32 / 0.46},
    "lomo": {"pretrain": 0.70, "finetune": 0.90},  # SGD's update in backward (LOMO paper: fine-tuning only)
    "adalomo": {"pretrain": 600.0 / 609.8, "finetune": APPROX_CAP},  # factored second moment, like Adam-mini
    # adapters — finetune: (SST-2 acc ÷ 0.825 + CoNLL F1 ÷ 0.722) / 2, r8 rows
    "lora": {"finetune": (0.821 / 0.825 + 0.696 / 0.722) / 2},
    "dora": {"finetune": (0.819 / 0.825 + 0.696 / 0.722) / 2},
    "qlora": {"finetune": (0.810 / 0.825 + 0.687 / 0.722) / 2},
    "lisa": {"finetune": (0.802 / 0.825 + 0.387 / 0.722) / 2},
    "lst": {"finetune": (0.796 / 0.825 + 0.519 / 0.722) / 2},
    # issue-17 methods, from their quick rows (docs/benchmarks.md; MiniLM, 60-150 steps, noisy): adapters relative
    # to LoRA r8 in the same run (SST-2 0.71 mean of two runs, CoNLL F1 0.323) times LoRA's factor, capped
    "unipt": {"finetune": (0.725 / 0.71 + 0.309 / 0.323) / 2 * 0.979},  # own-state term: CoNLL F1 0.008 -> 0.309
    "sherl": {"finetune": APPROX_CAP},  # (0.738 / 0.71 + 0.359 / 0.323) / 2 * 0.979 = 1.05: capped
    "switchlora": {"finetune": 0.700 / 0.71 * 0.979},  # SST-2 only
    "sketchtune": {"finetune": (0.672 / 0.71 + 0.213 / 0.323) / 2 * 0.979},
    "slimfit": {"finetune": 0.797 / 0.819},  # SST-2, 150 steps, half the layers frozen, vs full fine-tuning
    # MEFT stayed near chance on SST-2 in 60 steps (0.528; its gradients are exact): planned, ranked by that
    "meft": {"finetune": 0.528 / 0.71 * 0.979},
    # Q-GaLore: only a 4-step smoke row (loss 7.40 vs GaLore-8bit's 7.47): GaLore-8bit's prior, capped once more
    # for its int8 weights
    "q_galore": {"pretrain": APPROX_CAP * APPROX_CAP, "finetune": 0.32 / 0.46 * APPROX_CAP * APPROX_CAP},
    # WTA-CRS, budget 0.3: eval loss 8.730 vs exact 8.711 (seq 256; 8.606 vs 8.608 at 1024) after 3 steps ->
    # perplexity ratio exp(-0.019); not measured on fine-tuning (Llama blocks only): assumed the same
    "wta_crs": {"pretrain": 0.981, "finetune": 0.981},
    # ZO2's updates are MeZO's bit for bit (tested): MeZO's prior
    "zo2": {"pretrain": 0.05, "finetune": 0.539 / 0.789},
    # steps — SST-2, MeZO full 0.539 vs AdamW 0.789 at equal forwards
    "backprop": {"pretrain": EXACT, "finetune": EXACT},
    "mezo": {"pretrain": 0.05, "finetune": 0.539 / 0.789},
    # activations and precision: exact
    "checkpointing": {"pretrain": EXACT, "finetune": EXACT},
    "chunked_ce": {"pretrain": EXACT, "finetune": EXACT},
    "streambp": {"pretrain": EXACT, "finetune": EXACT},
}
"""Missing (technique, kind) pairs are not planned for that kind: adapters are never planned for pre-training."""

PRECISION_QUALITY = {"fp32": EXACT, "32-true": EXACT, "bf16": 0.999, "bf16-mixed": 0.999, "bf16-true": APPROX_CAP}
"""bf16 autocast matches fp32 within noise (Micikevicius et al. 2018: mixed precision); bf16 weights without an\nfp32 master copy lose small updates (capped as an approximation)."""

SPEED: dict[str, float] = {
    # step time multiplier vs plain AdamW backprop (>1 slower): 1 / measured "tok/s vs AdamW"
    "adamw_8bit": 1 / 0.53, "adam_mini": 1 / 0.88, "galore": 1 / 1.0, "galore_8bit": 1 / 0.97,
    "apollo": 1 / 1.0, "apollo_mini": 1 / 0.86, "sgd": 0.95, "lomo": 1.0, "adalomo": 1.05,
    "layerwise": 1 / 0.79,
    "lora": 1 / 1.33, "dora": 1 / 1.15, "qlora": 1 / 1.20, "lisa": 1 / 0.93, "lst": 1 / 1.98,
    "checkpointing": 4 / 3,  # one more forward: 8N instead of 6N FLOPs per token
    "chunked_ce": 1.02, "streambp": 1.4,
    "mezo": 1 / 1.15 * 3,  # 1.15 steps/s vs 1.36 at 2 forwards per step: per token of *useful* progress, slower
    "slimfit": 46 / 95,  # 95 vs 46 tokens/s of full fine-tuning (frozen layers skip their weight gradients)
    "q_galore": 878 / 705,  # tok/s vs AdamW, quick optim rows
    "wta_crs": (859 / 1164 + 989 / 680) / 2,  # faster at seq 256, slower at 1024 (3-step rows): the mean
    "zo2": 1 / 1.15 * 3 * 5.98 / 4.16,  # MeZO's, times ZO2's 5.98 vs 4.16 s/step (blocks copied from the file)
    "meft": 4 / 3,  # assumed: backward recomputes each layer, as checkpointing does (not measured)
}

NOMINAL_FLOPS = {"cpu": 170e9, "cuda": 400e12}
"""Matmul peak memfit measured on this CPU (docs/benchmarks.md, baseline) and a round figure for a current GPU in
bf16; times `NOMINAL_MFU`. Only ratios between plans matter for the ranking."""
NOMINAL_MFU = 0.4


def task_kind(task: str, pretrained: bool) -> str:
    """'pretrain' (from scratch) or 'finetune' (from pretrained weights)."""
    return "finetune" if pretrained else "pretrain"


def technique_quality(name: str, kind: str) -> float | None:
    """Expected quality factor, or None when the technique is not planned for this kind of task."""
    return QUALITY.get(name, {}).get(kind)


PRECISION_SPEED = {("cpu", "bf16"): 1.3, ("cpu", "bf16-mixed"): 1.3, ("cuda", "bf16"): 0.5,
                   ("cuda", "bf16-mixed"): 0.5, ("cuda", "bf16-true"): 0.45}
"""Step time vs fp32: tensor cores run bf16 about twice as fast (assumed); CPU autocast adds casts (assumed
30 % slower — not measured here)."""


def precision_speed(precision: str, device: str) -> float:
    return PRECISION_SPEED.get((device, precision), 1.0)
