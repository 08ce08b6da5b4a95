"""`memfit.plan(model_or_config, task=..., budget=...)`: the planner from Python, for the user's own training loop.

    import memfit
    p = memfit.plan(model, task="finetune-causal", budget="6GiB", seq=512, batch=4)
    print(p.chosen.label, p.why())
    model, optimizer = p.apply(model)          # the user's PyTorch loop (or HF Trainer(optimizers=(optimizer, None)))

In a loop memfit does not run, only techniques that act through the model and the optimizer take effect, so the
plan is chosen among those: a technique that overrides `wrap_loss`, `wrap_forward_backward`, `make_train_step` or
the per-step hooks (`techniques/base.py`) is left out (memfit's own `train` runs those). Read off the protocol,
not a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.plan.planner import Plan, PlanRow, parse_bytes

LOOP_HOOKS = ("wrap_loss", "wrap_forward_backward", "make_train_step", "on_step_start", "on_step_end")


def works_in_user_loop(technique) -> bool:
    """The technique acts only through `apply` (model edits) and the optimizer it builds."""
    from memfit.techniques.base import StepTechnique, Technique

    cls = type(technique)
    for hook in LOOP_HOOKS:
        base = StepTechnique if hook == "make_train_step" else Technique
        mine = getattr(cls, hook, None)
        if mine is not None and mine is not getattr(base, hook, None) and not (
                hook == "make_train_step" and technique.name == "backprop"):
            return False
    return True


@dataclass
class UserPlan:
    """The planner's result for a model the user holds; `apply` turns the chosen plan into (model, optimizer)."""

    result: Plan
    spec_recipe: dict[str, Any]

    @property
    def chosen(self) -> PlanRow:
        return self.result.chosen

    @property
    def recipe(self) -> dict[str, Any]:
        return self.chosen.recipe

    def why(self) -> str:
        return self.result.why()

    def pareto(self) -> list[PlanRow]:
        return self.result.pareto()

    def to_dict(self) -> dict[str, Any]:
        return self.result.to_dict()

    def apply(self, model: nn.Module, device: str | torch.device | None = None) -> tuple[nn.Module, Any]:
        """Apply the chosen techniques to `model` (a transformers model) and build their optimizer: returns the
        (possibly wrapped) model and a `torch.optim.Optimizer` for any PyTorch loop."""
        from memfit.recipe import load_recipe
        from memfit.techniques.base import ESTIMATE_ORDER, Context
        from memfit.train.build import apply_techniques, build_optimizer, by_slot, run_spec
        from memfit.train.step import model_loss

        recipe = load_recipe(self.recipe)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        techniques = sorted(recipe.techniques(), key=lambda t: ESTIMATE_ORDER.index(t.slot))
        ctx = Context(model=model, spec=run_spec(recipe, model, device), device=device, loss_fn=model_loss,
                      grad_clip=recipe.train.clip_grad_norm, seed=recipe.seed, techniques=techniques)
        apply_techniques(ctx)
        ctx.model.to(device)
        ctx.model.train()
        optimizer = build_optimizer(by_slot(techniques, "optimizer")[0], ctx)
        return ctx.model, optimizer


def plan(model_or_config: nn.Module | str | Path | Any, task: str = "finetune-causal", budget: str | int = "24GiB",
         seq: int = 512, batch: int = 1, device: str = "auto", scope: str = "process",
         precision: str | None = None, nproc: int | None = None) -> UserPlan:
    """Plan for a live transformers model, a `PretrainedConfig`, a model folder or a `config.json`.

    `task`: finetune-causal, pretrain-causal, finetune-cls, finetune-ner. `budget`: bytes or "24GiB" — the
    process's (CPU) or the device's (CUDA) peak, or the tensors' with `scope="tensors"`. `precision`: the one to
    plan for (default: every precision the recipe takes). `nproc`: plan one rank of an FSDP2 run on that many
    processes (`batch` is the global batch)."""
    from memfit.plan.planner import plan as make_plan
    from memfit.plan.target import recipe_for

    limit = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    model = None
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or "user-model"
        if getattr(model, "config", None) is None:
            raise ConfigError(f"{type(model).__name__} has no transformers config; memfit.plan needs a transformers "
                              "model, its config or its folder")
        recipe, pretrained = recipe_for(name, task, seq=seq, batch=batch, device=device)
    elif hasattr(model_or_config, "to_dict") and hasattr(model_or_config, "model_type"):  # a PretrainedConfig
        import transformers

        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(model_or_config)
        recipe, pretrained = recipe_for(getattr(model_or_config, "_name_or_path", "") or "config", task, seq=seq,
                                        batch=batch, device=device)
    else:
        recipe, pretrained = recipe_for(str(model_or_config), task, seq=seq, batch=batch, device=device)
    result = make_plan(recipe, limit, scope=scope, pretrained=pretrained, model=model,
                       precisions=[precision] if precision else None, keep=works_in_user_loop, nproc=nproc)
    return UserPlan(result, recipe)
