"""The run loop: build a recipe's run, train with the chosen techniques, evaluate, checkpoint, measure."""

from memfit.train.loop import RunResult, train

__all__ = ["RunResult", "train"]
