"""Where memory goes: estimate it by category (`estimate`) and measure it by category (`measure`)."""

from memfit.memory.breakdown import CATEGORIES, MemoryBreakdown, format_bytes
from memfit.memory.spec import ModelShape, ParamInfo, RunSpec, model_shape

__all__ = ["CATEGORIES", "MemoryBreakdown", "ModelShape", "ParamInfo", "RunSpec", "format_bytes", "model_shape"]
