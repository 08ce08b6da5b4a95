"""The run loop: build a recipe's run, train with the chosen techniques, evaluate, checkpoint, measure.

`train` and `RunResult` load on first use, so `memfit estimate` and `memfit plan` (which need only
`memfit.train.build`) do not import the memory tracker and the loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memfit.train.loop import RunResult, train

__all__ = ["RunResult", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from memfit.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'memfit.train' has no attribute {name!r}")
