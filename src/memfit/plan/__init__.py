"""Planning: predict a recipe's peak memory by category without running it (the model is built on `meta`), and
choose the best plan that fits a budget.

The package is callable: `memfit.plan(model_or_config, task=..., budget=...)` is `memfit.plan.api.plan` (the
Python API for the user's own loop)."""

import sys
import types

from memfit.plan.meta import estimate_recipe, meta_model
from memfit.plan.planner import Plan, PlanRow, choose, parse_bytes, plan, verify

__all__ = ["Plan", "PlanRow", "choose", "estimate_recipe", "meta_model", "parse_bytes", "plan", "verify"]


class _CallablePackage(types.ModuleType):
    def __call__(self, model_or_config, **options):
        from memfit.plan.api import plan as plan_for_model

        return plan_for_model(model_or_config, **options)


sys.modules[__name__].__class__ = _CallablePackage
