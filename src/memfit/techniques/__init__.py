"""The technique plug-in point: one method from one paper, applied to a run and able to estimate itself."""

from memfit.techniques.base import (
    Context,
    ForwardBackward,
    LossFn,
    OptimizerTechnique,
    StepTechnique,
    Technique,
    TechniqueConfig,
    TrainStep,
)
from memfit.techniques.registry import SLOTS, available, build_technique, technique_class

__all__ = [
    "SLOTS",
    "Context",
    "ForwardBackward",
    "LossFn",
    "OptimizerTechnique",
    "StepTechnique",
    "Technique",
    "TechniqueConfig",
    "TrainStep",
    "available",
    "build_technique",
    "technique_class",
]
