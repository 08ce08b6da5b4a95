"""Planning: predict a recipe's peak memory by category without running it (the model is built on `meta`), and
choose the best plan that fits a budget."""

from memfit.plan.meta import estimate_recipe, meta_model
from memfit.plan.planner import Plan, PlanRow, choose, parse_bytes, plan, verify

__all__ = ["Plan", "PlanRow", "choose", "estimate_recipe", "meta_model", "parse_bytes", "plan", "verify"]
