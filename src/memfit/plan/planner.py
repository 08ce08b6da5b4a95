"""The planner: for a run and a memory budget, predict the peak of every compatible combination of techniques
(`plan/space.py`), keep those that fit, and rank them by expected quality for the task, then predicted speed
(`plan/quality.py`); print the Pareto set and say why the winner won; optionally prove the choice by measuring.

The budget is the process's peak by default (tensors + the `runtime` category, `memory/runtime.py`: on CPU the
RSS high-water mark, on CUDA what the device holds); `scope="tensors"` compares the tensor peak alone.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfit.errors import BudgetError, ConfigError, MemfitError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.plan.space import Combination

QUALITY_RESOLUTION = 0.01
"""Expected-quality differences below 1 % are ties (the measured tables' own noise is larger); speed decides."""

SCOPES = ("process", "tensors")


@dataclass
class PlanRow:
    candidate: Combination
    breakdown: MemoryBreakdown | None  # by category, `runtime` filled
    peak: int | None  # predicted tensor peak of a step
    process_peak: int | None  # tensors + runtime
    fits: bool
    quality: float = 0.0  # expected, relative to exact full training (1.0)
    tokens_per_s: float = 0.0  # predicted
    problem: str = ""  # why the candidate cannot be estimated for this run
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.candidate.label

    def scoped(self, scope: str) -> int | None:
        return self.peak if scope == "tensors" else self.process_peak

    @property
    def rank_key(self) -> tuple:
        return (-round(self.quality / QUALITY_RESOLUTION), -self.tokens_per_s, self.process_peak or 0)


@dataclass
class Plan:
    rows: list[PlanRow]  # fitting ones first, in rank order
    budget: int
    scope: str
    pruned: int  # combinations the techniques' declared rules excluded
    seconds: float  # CPU time spent choosing (enumerate + estimate + rank): not inflated by other processes
    task_kind: str
    wall_seconds: float = 0.0
    nproc: int = 1  # > 1: every peak is one rank's of an FSDP2 run on that many processes

    @property
    def fitting(self) -> list[PlanRow]:
        return [r for r in self.rows if r.fits]

    @property
    def chosen(self) -> PlanRow:
        return choose(self.rows, self.budget, self.scope)

    def pareto(self) -> list[PlanRow]:
        """Fitting plans no other fitting plan beats on all of peak, tokens/s and expected quality."""
        fit = self.fitting

        def dominated(r: PlanRow) -> bool:
            return any(o is not r and o.process_peak <= r.process_peak and o.tokens_per_s >= r.tokens_per_s
                       and o.quality >= r.quality and (o.process_peak, -o.tokens_per_s, -o.quality)
                       != (r.process_peak, -r.tokens_per_s, -r.quality) for o in fit)
        return sorted((r for r in fit if not dominated(r)), key=lambda r: r.rank_key)

    def why(self) -> str:
        """One sentence: why the chosen plan won."""
        win = self.chosen
        fit = self.fitting
        same_q = [r for r in fit if r.rank_key[0] == win.rank_key[0]]
        text = (f"{win.label} has the highest expected quality for {self.task_kind} ({win.quality:.3f} of exact "
                f"full training) among {len(fit)} plans that fit")
        if len(same_q) > 1:
            text += f"; of the {len(same_q)} within {QUALITY_RESOLUTION:.0%} of it, it is the fastest " \
                    f"({win.tokens_per_s:,.0f} predicted tokens/s)"
        better = [r for r in self.rows if not r.fits and r.peak is not None and r.rank_key < win.rank_key]
        if better:
            b = min(better, key=lambda r: r.rank_key)
            text += (f"; {b.label} would rank higher (quality {b.quality:.3f}) but needs "
                     f"{b.scoped(self.scope) / 2**20:,.0f} MiB")
        return text + "."

    def to_dict(self) -> dict[str, Any]:
        def row(r: PlanRow) -> dict[str, Any]:
            return {"plan": r.label, "fits": r.fits, "quality": round(r.quality, 4),
                    "tokens_per_s": round(r.tokens_per_s, 1), "tensor_peak": r.peak, "process_peak": r.process_peak,
                    "breakdown": r.breakdown.to_dict() if r.breakdown else None, "problem": r.problem or None}
        chosen = choose(self.rows, self.budget, self.scope) if self.fitting else None
        return {"budget": self.budget, "scope": self.scope, "task_kind": self.task_kind, "nproc": self.nproc,
                "per_rank": self.nproc > 1,
                "combinations": len(self.rows), "pruned_by_rules": self.pruned, "choosing_cpu_s": round(self.seconds, 3),
                "choosing_wall_s": round(self.wall_seconds, 3),
                "chosen": row(chosen) if chosen else None, "why": self.why() if chosen else None,
                "recipe": chosen.recipe if chosen else None, "pareto": [row(r) for r in self.pareto()],
                "rows": [row(r) for r in self.rows]}


def parse_bytes(text: str) -> int:
    """'2GiB', '512 MiB', '1.5G', '800M', '123456' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"budget '{text}' is not a size; write it like 2GiB, 512MiB or 800M")
    value, unit = float(match.group(1)), match.group(2).upper()
    return int(value * 1024 ** " KMGT".index(unit or " "))


def _with_slots(recipe: dict[str, Any], cand: Combination, lr_scale: float = 1.0, nproc: int | None = None
                ) -> dict[str, Any]:
    """The user's recipe with its technique slots replaced by the candidate's, its precision set (the user's LR is
    kept, times the techniques' declared `plan_lr_scale`), and `distributed.nproc` when planned for N ranks."""
    out = {k: copy.deepcopy(v) for k, v in recipe.items()
           if k not in ("optimizer", "adapter", "weights", "activations", "step")}
    out["train"] = {**out.get("train", {}), "precision": cand.precision}
    if nproc is not None:
        out["distributed"] = {**out.get("distributed", {}), "nproc": nproc}
    user_opt = recipe.get("optimizer")
    lr = user_opt.get("lr") if isinstance(user_opt, dict) else None
    for key, value in copy.deepcopy(cand.slots).items():
        if key == "optimizer" and lr is not None and isinstance(value, dict):  # a name: the step's own update
            value.setdefault("lr", lr * lr_scale)
        out[key] = value
    return out


def recipe_precisions() -> list[str]:
    """The precisions a recipe accepts (`memory/precision.py`, Lightning's names) that the quality prior knows."""
    from memfit.memory.precision import PRECISIONS
    from memfit.plan.quality import PRECISION_QUALITY

    return [p for p in PRECISIONS if p in PRECISION_QUALITY]


def plan(recipe: dict[str, Any], budget: int, scope: str = "process", pretrained: bool | None = None,
         model=None, precisions: list[str] | None = None, keep=None, nproc: int | None = None) -> Plan:
    """Every compatible combination's predicted peak, quality and speed; fitting ones first in rank order.
    `model`: a model (meta or real) to plan for instead of building the recipe's on the meta device;
    `precisions`: the ones to try (default: every one the recipe takes); `keep(technique) -> bool`: only plans
    whose every technique passes (the Python API keeps those that work in the user's own loop).
    `nproc` > 1: plan one rank of an FSDP2 run on that many processes (`memory.sharding.estimate_rank`; the
    recipe's batch is the global batch), among the techniques that run sharded (`distributed/support.py`)."""
    from memfit.distributed.support import refusal
    from memfit.memory.estimate import estimate_step
    from memfit.memory.runtime import with_runtime
    from memfit.memory.sharding import estimate_rank
    from memfit.plan.meta import meta_facts, spec_for
    from memfit.plan.quality import PRECISION_QUALITY, task_kind
    from memfit.plan.space import combinations
    from memfit.recipe import load_recipe
    from memfit.train.build import model_facts

    if scope not in SCOPES:
        raise ConfigError(f"--scope must be one of {', '.join(SCOPES)}, got '{scope}'")
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    world = nproc or 1

    base = load_recipe(recipe)
    if base.train.batch_size % world:
        raise ConfigError(f"train.batch_size {base.train.batch_size} is the global batch and must split evenly over "
                          f"{world} ranks; use a multiple of {world}")
    facts = model_facts(model) if model is not None else meta_facts(base)
    pretrained = base.model.path is not None if pretrained is None else pretrained
    kind = task_kind(base.task, pretrained)
    t0, w0 = time.process_time(), time.perf_counter()
    specs = {p: spec_for(base, facts, p) for p in (precisions or recipe_precisions())}
    device = next(iter(specs.values())).extra.get("device", "cpu")
    combos, pruned = combinations(next(iter(specs.values())), pretrained, list(specs))
    rows = []
    for cand in combos:
        if keep is not None and not all(keep(t) for t in cand.techniques):
            pruned += 1
            continue
        if world > 1 and any(refusal(t) for t in cand.techniques):
            pruned += 1  # cannot run on several processes
            continue
        quality = _quality(cand, kind, PRECISION_QUALITY)
        if quality is None:
            pruned += 1  # a technique the prior does not plan for this kind of task (adapters from scratch)
            continue
        lr_scale = math.prod(t.plan_lr_scale for t in cand.techniques)
        spec = specs[cand.precision]
        try:
            if world > 1:
                rank = estimate_rank(spec, list(cand.techniques), world, base.distributed.reshard_after_forward)
                breakdown, peak = rank.breakdown, rank.peak
            else:
                breakdown, peak = estimate_step(spec, list(cand.techniques))
        except (MemfitError, ValueError, NotImplementedError, KeyError) as exc:
            rows.append(PlanRow(cand, None, None, None, False, quality, 0.0, str(exc).splitlines()[0]))
            continue
        breakdown, process_peak = with_runtime(breakdown, peak, spec, cand.techniques)
        row = PlanRow(cand, breakdown, peak, process_peak, False, quality, _tokens_per_s(spec, cand, device))
        row.fits = row.scoped(scope) <= budget
        rows.append(row)
    rows.sort(key=lambda r: (not r.fits, r.peak is None, r.rank_key if r.fits else (), r.process_peak or 0))
    seconds, wall = time.process_time() - t0, time.perf_counter() - w0
    for r in rows:
        r.recipe = _with_slots(recipe, r.candidate, math.prod(t.plan_lr_scale for t in r.candidate.techniques),
                               nproc)
    return Plan(rows, budget, scope, pruned, seconds, kind, wall, world)


def _quality(cand: Combination, kind: str, precision_quality: dict[str, float]) -> float | None:
    from memfit.plan.quality import technique_quality

    q = precision_quality[cand.precision]
    for t in cand.techniques:
        tq = technique_quality(t.name, kind)
        if tq is None:
            return None
        q *= tq
    return q


def _tokens_per_s(spec, cand: Combination, device: str) -> float:
    from memfit.plan.quality import NOMINAL_FLOPS, NOMINAL_MFU, SPEED, precision_speed

    m = spec.model
    flops_per_token = 6 * m.n_params + 6 * m.n_layers * m.hidden * spec.seq  # Kaplan et al. 2020 (bench/mfu.py)
    slowdown = precision_speed(cand.precision, device)
    for t in cand.techniques:
        slowdown *= SPEED.get(t.name, 1.0)
        if getattr(t.config, "layerwise", False) and t.slot == "optimizer":
            slowdown *= SPEED["layerwise"]
    return NOMINAL_FLOPS.get(device, NOMINAL_FLOPS["cpu"]) * NOMINAL_MFU / flops_per_token / slowdown


def choose(rows: list[PlanRow], budget: int, scope: str = "process") -> PlanRow:
    fitting = [r for r in rows if r.fits]
    if not fitting:
        smallest = min((r for r in rows if r.peak is not None), key=lambda r: r.scoped(scope), default=None)
        hint = (f"; the smallest plan, {smallest.label}, needs {smallest.scoped(scope) / 2**20:,.0f} MiB "
                f"({'tensors' if scope == 'tensors' else 'process peak'}) — lower train.batch_size or the sequence "
                f"length, or raise the budget") if smallest else ""
        raise BudgetError(f"no plan fits {budget / 2**20:,.0f} MiB{hint}")
    return min(fitting, key=lambda r: r.rank_key)


def verify(row: PlanRow, steps: int = 2):
    """Run the chosen plan for a few measured steps; return the run result (measured report inside)."""
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
