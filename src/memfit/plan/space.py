"""The space of plans: every compatible combination of the techniques that declare themselves plannable.

A technique takes part by declaring, on its class (`techniques/base.py`): `plan_options` / `plan_variants` (the
recipe values to try), `tasks` (which tasks it applies to), `conflicts` (techniques it cannot run with),
`needs_pretrained` (never from scratch) and, for optimizers, `full_weights_only` (never over an adapter). A step
that `owns_optimizer` keeps the default optimizer. The product optimizer × adapter × activations × step ×
precision is pruned by those declarations alone — nothing here names a technique.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from memfit.memory.spec import RunSpec
from memfit.techniques.base import Technique

PLAN_SLOTS = ("optimizer", "adapter", "activations", "step")


@dataclass(frozen=True)
class Combination:
    """One plan: recipe values per slot, the precision, and the built techniques (in slot order)."""

    slots: dict[str, Any]
    precision: str
    techniques: tuple[Technique, ...] = field(compare=False, default=())

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.techniques]

    @property
    def label(self) -> str:
        parts = []
        for t in self.techniques:
            if t.slot == "step" and t.name == "backprop":
                continue
            options = {k: v for k, v in t.config.model_dump().items()
                       if k in ("r", "rank", "layerwise") and v not in (False, None)}
            text = t.name + ("" if not options else " " + " ".join(
                "layer-wise" if k == "layerwise" else f"{k}={v}" for k, v in options.items()))
            parts.append(text)
        return " + ".join(parts) + f" ({self.precision})"


def plannable(slot: str, spec: RunSpec, pretrained: bool) -> list[tuple[type[Technique], dict]]:
    """(class, recipe value) for every registered technique of `slot` that declares variants for this run."""
    from memfit.techniques.registry import SLOTS, technique_class

    out = []
    for name in SLOTS[slot]:
        cls = technique_class(slot, name)
        if cls.tasks is not None and spec.task not in cls.tasks:
            continue
        if cls.needs_pretrained and not pretrained:
            continue
        out += [(cls, value) for value in cls.plan_variants(spec, pretrained)]
    return out


def _build(slot: str, value: dict, cache: dict) -> Technique:
    from memfit.techniques.registry import build_technique

    key = (slot, json.dumps(value, sort_keys=True))
    if key not in cache:
        cache[key] = build_technique(slot, value)
    return cache[key]


def combinations(spec: RunSpec, pretrained: bool, precisions: list[str]) -> tuple[list[Combination], int]:
    """Every compatible combination, and how many the declared rules pruned."""
    cache: dict = {}
    options = {slot: plannable(slot, spec, pretrained) for slot in PLAN_SLOTS}
    activation_sets = [()]
    acts = options["activations"]
    for n in range(1, len(acts) + 1):
        activation_sets += list(itertools.combinations(acts, n))
    from memfit.recipe import Recipe

    default_opt = {"name": Recipe.model_fields["optimizer"].default}
    out, pruned = [], 0
    for (ocls, ovalue), adapter, act_set, (scls, svalue), precision in itertools.product(
            options["optimizer"], [None, *options["adapter"]], activation_sets, options["step"], precisions):
        if getattr(scls, "owns_optimizer", False) and ovalue != default_opt:
            pruned += 1  # the step brings its own update rule; one plan with the default optimizer is enough
            continue
        if adapter is not None and ocls.full_weights_only:
            pruned += 1
            continue
        owns = getattr(scls, "owns_optimizer", False)
        chosen = [*([] if owns else [("optimizer", ovalue)]), *([("adapter", adapter[1])] if adapter else []),
                  *[("activations", v) for _, v in act_set], ("step", svalue)]
        techniques = [_build(slot, value, cache) for slot, value in chosen]
        if any(a.conflict_with(b) for a, b in itertools.combinations(techniques, 2)):
            pruned += 1
            continue
        slots: dict[str, Any] = {"optimizer": ovalue["name"] if owns else ovalue, "step": svalue}
        if adapter:
            slots["adapter"] = adapter[1]
        if act_set:
            slots["activations"] = [v for _, v in act_set]
        ordered = tuple(sorted(techniques, key=lambda t: t.order))
        out.append(Combination(slots, precision, ordered))
    return out, pruned
