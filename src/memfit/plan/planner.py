"""The planner: for a recipe and a memory budget, predict every candidate plan's peak by category, keep those
that fit, rank them, and optionally prove the choice by measuring a few real steps.

A candidate is a set of technique-slot values laid over the user's recipe. Ranking prefers *fidelity* first —
exact full training, then exact math with compressed storage, then low-rank optimizer state, then fewer trainable
parameters, then zeroth order — and, within a tier, plans that recompute less and then take less memory.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfit.errors import BudgetError, ConfigError, MemfitError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import ModelShape

FIDELITY = {
    0: "exact full training",
    1: "exact, compressed optimizer state",
    2: "low-rank optimizer state",
    3: "fewer trainable parameters",
    4: "zeroth order (no backprop)",
}


@dataclass(frozen=True)
class Candidate:
    label: str
    fidelity: int
    slots: dict[str, Any]
    recompute: int = 0  # rough extra forward work (1: checkpointing, 2: StreamBP's per-chunk recompute)
    lr_scale: float = 1.0  # multiplies the user's learning rate


@dataclass
class PlanRow:
    candidate: Candidate
    breakdown: MemoryBreakdown | None
    peak: int | None
    fits: bool
    problem: str = ""  # why the candidate does not apply to this recipe
    recipe: dict[str, Any] = field(default_factory=dict)


def parse_bytes(text: str) -> int:
    """'2GiB', '512 MiB', '1.5G', '800M', '123456' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"budget '{text}' is not a size; write it like 2GiB, 512MiB or 800M")
    value, unit = float(match.group(1)), match.group(2).upper()
    return int(value * 1024 ** " KMGT".index(unit or " "))


ADAPTER_LR_SCALE = 10.0
"""Adapters train few weights with larger steps: on SST-2 (bench fewer-params) LoRA at 1e-3 matched full
fine-tuning at 1e-4."""


GALORE_FINE_TUNE_SCALE = 4.0
"""GaLore's update scale when fine-tuning pretrained weights (its pre-training default 0.25 barely moves them: on
CoNLL with MiniLM, GaLore at scale 1 reached 0 entity F1 after 60 steps, at scale 4 0.32, AdamW 0.46)."""


def candidates(task: str, shape: ModelShape, fine_tune: bool = False) -> list[Candidate]:
    """Curated plans for a task; ranks scale with the model (GaLore/APOLLO papers use ~hidden/4 on small models).
    `fine_tune`: the recipe starts from pretrained weights (GaLore then uses its fine-tuning scale)."""
    rank = max(4, shape.hidden // 4)
    galore = {"name": "galore", "rank": rank, **({"scale": GALORE_FINE_TUNE_SCALE} if fine_tune else {})}
    ckpt = {"name": "checkpointing"}
    lm = task == "causal_lm"
    act_exact = [ckpt, {"name": "chunked_ce"}] if lm else [ckpt]
    plans = [
        Candidate("AdamW (baseline)", 0, {}),
        Candidate("AdamW, layer-wise updates", 0, {"optimizer": {"name": "adamw", "layerwise": True}}),
        Candidate("AdamW + checkpointing", 0, {"activations": [ckpt]}, recompute=1),
        Candidate("AdamW layer-wise + checkpointing" + (" + chunked CE" if lm else ""), 0,
                  {"optimizer": {"name": "adamw", "layerwise": True}, "activations": act_exact}, recompute=1),
        *([Candidate("AdamW + StreamBP", 0, {"activations": [{"name": "streambp", "chunk_size": 256}]},
                     recompute=2)] if lm else []),
        Candidate("8-bit AdamW", 1, {"optimizer": "adamw_8bit"}),
        Candidate("Adam-mini", 1, {"optimizer": "adam_mini"}),
        Candidate("8-bit AdamW layer-wise + checkpointing", 1,
                  {"optimizer": {"name": "adamw_8bit", "layerwise": True}, "activations": act_exact}, recompute=1),
        Candidate(f"GaLore r={rank}", 2, {"optimizer": galore}),
        Candidate("APOLLO-Mini", 2, {"optimizer": "apollo_mini"}),
        Candidate(f"GaLore r={rank} layer-wise + checkpointing", 2,
                  {"optimizer": {**galore, "layerwise": True}, "activations": act_exact},
                  recompute=1),
        Candidate("LoRA r=16", 3, {"adapter": {"name": "lora", "r": 16}}, lr_scale=ADAPTER_LR_SCALE),
        Candidate("LoRA r=16 + checkpointing", 3, {"adapter": {"name": "lora", "r": 16}, "activations": act_exact},
                  recompute=1, lr_scale=ADAPTER_LR_SCALE),
        Candidate("QLoRA r=16 + checkpointing", 3, {"adapter": {"name": "qlora", "r": 16}, "activations": act_exact},
                  recompute=1, lr_scale=ADAPTER_LR_SCALE),
        Candidate("MeZO (full model)", 4, {"step": {"name": "mezo"}}),
        Candidate("MeZO on LoRA r=16", 4, {"step": {"name": "mezo"}, "adapter": {"name": "lora", "r": 16}}),
    ]
    return plans


def _with_slots(recipe: dict[str, Any], slots: dict[str, Any], lr_scale: float = 1.0) -> dict[str, Any]:
    """The user's recipe with its technique slots replaced by the candidate's (the user's LR is kept, times
    the candidate's `lr_scale`)."""
    out = {k: copy.deepcopy(v) for k, v in recipe.items()
           if k not in ("optimizer", "adapter", "weights", "activations", "step")}
    user_opt = recipe.get("optimizer")
    lr = user_opt.get("lr") if isinstance(user_opt, dict) else None
    for key, value in {"optimizer": "adamw", **copy.deepcopy(slots)}.items():
        if key == "optimizer" and "step" in slots:
            continue  # a zeroth-order step is its own optimizer (its lr is under `step:`)
        if key == "optimizer" and lr is not None:
            value = {"name": value} if isinstance(value, str) else value
            value.setdefault("lr", lr * lr_scale)
        out[key] = value
    return out


def plan(recipe: dict[str, Any], budget: int) -> list[PlanRow]:
    """Every candidate's predicted step peak, fitting ones first in rank order."""
    from memfit.memory.estimate import estimate_step
    from memfit.plan.meta import meta_model
    from memfit.recipe import load_recipe
    from memfit.train.build import resolve_device, run_spec

    base = load_recipe(recipe)
    spec = run_spec(base, meta_model(base), resolve_device(base.train.device))
    rows = []
    for cand in candidates(base.task, spec.model, fine_tune=base.model.preset is None):
        candidate_recipe = _with_slots(recipe, cand.slots, cand.lr_scale)
        try:
            rec = load_recipe(candidate_recipe)
            breakdown, peak = estimate_step(spec, rec.techniques())
        except MemfitError as exc:
            rows.append(PlanRow(cand, None, None, False, str(exc).splitlines()[0], candidate_recipe))
            continue
        except Exception as exc:  # a technique whose estimate cannot handle this model: show it, don't crash
            rows.append(PlanRow(cand, None, None, False, f"cannot estimate: {exc}", candidate_recipe))
            continue
        rows.append(PlanRow(cand, breakdown, peak, peak <= budget, "", candidate_recipe))
    return sorted(rows, key=lambda r: (not r.fits, r.peak is None, r.candidate.fidelity if r.fits else 0,
                                       r.candidate.recompute if r.fits else 0, r.peak or 0))


def choose(rows: list[PlanRow], budget: int) -> PlanRow:
    fitting = [r for r in rows if r.fits]
    if not fitting:
        smallest = min((r for r in rows if r.peak is not None), key=lambda r: r.peak, default=None)
        hint = (f"; the smallest plan, {smallest.candidate.label}, needs {smallest.peak / 2**20:.0f} MiB — lower "
                f"train.batch_size or the sequence length, or raise the budget") if smallest else ""
        raise BudgetError(f"no plan fits {budget / 2**20:.0f} MiB{hint}")
    return fitting[0]


def verify(row: PlanRow, steps: int = 2):
    """Run the chosen plan for a few measured steps; return the measured report and the run result."""
    from memfit.recipe import load_recipe
    from memfit.train import train

    recipe = copy.deepcopy(row.recipe)
    recipe["train"] = {**recipe.get("train", {}), "steps": steps, "measure_steps": steps, "eval_every": 0,
                       "eval_batches": 1}
    return train(load_recipe(recipe), quiet=True)


def load_recipe_dict(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """The recipe as a plain dict (overrides applied, validated once) for laying candidate slots over it."""
    from memfit.recipe import load_recipe

    return load_recipe(path, overrides).model_dump(mode="json", exclude_none=True)
