"""Technique × precision: each training technique family run for real (`train.build.build_run`, two steps of a
tiny Llama) in each precision, measured by category against `estimate_step` on the same built run.

A row is measured on the second step (optimizer state exists before it starts): parameters, gradients and
temporaries as their category peaks, optimizer state as held after the step, activations as alive when the
loss has been computed (`None` where a technique computes its loss its own way; a zeroth-order step's
category peak, since its forwards save nothing), and the step's tensor peak
against the predicted step peak. A combination memfit refuses is a row with `refused` (the one-line error);
anything else that goes wrong is a `crash` row. `tests/memory/test_precision_matrix.py` asserts the rows.
"""

from __future__ import annotations

import copy
import traceback
from pathlib import Path
from typing import Any

import torch

PRECISION_NAMES = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")

TECHNIQUES: dict[str, dict[str, Any]] = {
    # name: the recipe slots it sets (over a full fine-tune with AdamW)
    "adamw": {},
    "adamw-master": {"train": {"master_weights": "fp32"}},
    "adamw-state-bf16": {"optimizer": {"name": "adamw", "state_dtype": "bf16"}},
    "adamw_8bit": {"optimizer": "adamw_8bit"},
    "galore": {"optimizer": {"name": "galore", "rank": 8}},
    "lora": {"adapter": {"name": "lora", "r": 4}},
    "qlora": {"adapter": {"name": "qlora", "r": 4}},
    "checkpointing": {"activations": ["checkpointing"]},
    "mezo": {"step": "mezo"},
    "lisa": {"adapter": {"name": "lisa", "layers": 1}},
    # ascending: the measured step trains block 0, the placement BAdam's estimate takes (the run's worst: every
    # block above it passes a gradient on); descending would measure the top block's round, which saves less
    "badam": {"adapter": {"name": "badam", "order": "ascending"}},
    "lomo": {"optimizer": "lomo"},
    "sgd": {"optimizer": {"name": "sgd", "momentum": 0.9}},
}

MORE_TECHNIQUES: dict[str, dict[str, Any]] = {
    # techniques outside the matrix whose estimate was under the measured peak once (tests/memory/test_precision_matrix.py)
    "switchlora": {"adapter": {"name": "switchlora", "r": 4}},
    "s2a": {"activations": ["s2a"]},
    "mesa": {"activations": ["mesa"]},
    "peqa": {"adapter": {"name": "peqa", "bits": 4}},
    "dora": {"adapter": {"name": "dora", "r": 4}},
}


def matrix_recipe(technique: str, precision: str, data: Path, preset: str = "llama-tiny", **train: Any
                  ) -> dict[str, Any]:
    """A two-step recipe (a Llama preset on the shared corpus) with `technique`'s slots, in `precision`."""
    recipe: dict[str, Any] = {
        "name": f"{technique}-{precision}", "task": "causal_lm", "model": {"preset": preset},
        "data": {"kind": "text", "paths": [str(data / "tinyshakespeare" / "input.txt")], "block_size": 32,
                 "vocab_size": 300, "max_chars": 20000},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 0, "measure_steps": 0, "clip_grad_norm": None,
                  "precision": precision, "num_threads": 1, **train},
        "optimizer": {"name": "adamw", "lr": 1e-3},
    }
    slots = copy.deepcopy({**TECHNIQUES, **MORE_TECHNIQUES}[technique])
    recipe["train"].update(slots.pop("train", {}))
    recipe.update(slots)
    if "step" in slots:
        recipe.pop("optimizer")
    return recipe


def measure_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Measured and estimated bytes by category for the second step of `recipe` (see the module docstring)."""
    from memfit.errors import MemfitError
    from memfit.memory.estimate import estimate_step
    from memfit.memory.measure import MemoryMeter
    from memfit.recipe import load_recipe
    from memfit.train.build import build_run
    from memfit.train.data_order import BatchStream
    from memfit.train.step import model_loss

    row: dict[str, Any] = {"run": recipe["name"]}
    seen: list[int] = []
    meter_box: list[MemoryMeter] = []  # set while the measured step runs

    def recording_loss(model, batch):
        loss = model_loss(model, batch)
        if meter_box:
            seen.append(meter_box[0].current().activations)
        return loss

    try:
        built = build_run(load_recipe(recipe), loss_fn=recording_loss)
        est, peak = estimate_step(built.spec, built.techniques)
        stream = BatchStream(built.data.train, built.recipe.train.batch_size, built.data.collate, seed=0)
        ctx = built.ctx
        for t in built.techniques:
            t.on_step_start(ctx)
        built.train_step([stream.shuffled(0)])
        ctx.step = 1
        meter = MemoryMeter(ctx.model, ctx.optimizer)
        meter_box.append(meter)
        for t in built.techniques:
            t.on_step_start(ctx)
        batch = stream.shuffled(1)  # made outside the region, as the run loop does
        with meter.region():
            built.train_step([batch])
        meter_box.clear()
        report = meter.report()
        state = meter.current().optimizer
        zeroth_order = any(getattr(t, "owns_optimizer", False) for t in built.techniques)
    except MemfitError as exc:
        return {**row, "refused": str(exc).splitlines()[0]}
    except Exception as exc:  # noqa: BLE001 - a crash is a result of the matrix
        return {**row, "crash": f"{type(exc).__name__}: {exc}".splitlines()[0],
                "where": traceback.format_exc().splitlines()[-3].strip()}
    cat = report.category_peaks
    measured = {"parameters": cat.parameters, "gradients": cat.gradients, "optimizer": state,
                "activations": cat.activations if zeroth_order else max(seen) if seen else None, "temporaries": cat.temporaries,
                "step_peak": report.tensor_peak}
    estimated = {"parameters": est.parameters, "gradients": est.gradients, "optimizer": est.optimizer,
                 "activations": est.activations, "temporaries": est.temporaries, "step_peak": peak}
    for key, m in measured.items():
        row[f"{key}_measured"] = m
        row[f"{key}_estimate"] = estimated[key]
        row[f"{key}_ratio"] = (None if m is None else round(m / estimated[key], 4) if estimated[key]
                               else (1.0 if m == 0 else None))
    row["param_dtypes"] = ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in ctx.model.parameters()
                                           if p.is_floating_point()}))
    return row


def matrix_rows(data: Path, techniques=TECHNIQUES, precisions=PRECISION_NAMES) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    return [{"technique": t, "precision": p, **measure_recipe(matrix_recipe(t, p, data))}
            for t in techniques for p in precisions]


def totals(rows: list[dict[str, Any]], tolerance: float = 0.05) -> dict[str, Any]:
    """Runs / refusals / crashes / step peaks within `tolerance`, and the worst step-peak ratio."""
    ran = [r for r in rows if "refused" not in r and "crash" not in r]
    ratios = [r["step_peak_ratio"] for r in ran]
    return {"runs": len(ran), "refused": sum("refused" in r for r in rows), "crashed": sum("crash" in r for r in rows),
            "within": sum(abs(x - 1) <= tolerance for x in ratios),
            "worst": max(ratios, key=lambda x: abs(x - 1), default=None)}
