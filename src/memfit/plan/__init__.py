"""Planning: predict a recipe's peak memory by category without running it (the model is built on `meta`)."""

from memfit.plan.meta import estimate_recipe, meta_model
from memfit.plan.planner import FIDELITY, Candidate, PlanRow, choose, parse_bytes, plan, verify

__all__ = ["FIDELITY", "Candidate", "PlanRow", "choose", "estimate_recipe", "meta_model", "parse_bytes", "plan",
           "verify"]
