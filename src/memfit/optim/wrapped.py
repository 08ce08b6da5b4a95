"""`WrappedOptimizer`: an optimizer that runs another one its own way (layer-wise in backward, one parameter at a
time on an fp32 view, one unit at a time with its state on disk) and shows the loop, LR schedules and checkpoints
the wrapped optimizer's groups and state; `WrappedTechnique`: the optimizer technique that builds it."""

from __future__ import annotations

from collections import OrderedDict

import torch

from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context, OptimizerTechnique

_HOOK_DICTS = ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
               "load_state_dict_post")


def init_optimizer_hooks(optimizer: torch.optim.Optimizer) -> None:
    """The hook registries `torch.optim.Optimizer.__init__` makes, for a wrapper that does not call it: step and
    state-dict hooks then work as on any torch optimizer (memory trackers register them). OrderedDicts, as torch's
    own: hook handles keep weak references to them."""
    for kind in _HOOK_DICTS:
        setattr(optimizer, f"_optimizer_{kind}_hooks", OrderedDict())


class WrappedOptimizer(torch.optim.Optimizer):
    """Delegates `param_groups`, `state`, `defaults` and `zero_grad` to `self.optimizer`; subclasses write `step`
    (and `state_dict` / `load_state_dict` for what they keep themselves)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        # Optimizer.__init__ is not called: groups, defaults and state are the wrapped optimizer's
        self.optimizer = optimizer
        init_optimizer_hooks(self)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class WrappedTechnique(OptimizerTechnique):
    """An optimizer technique that runs another one its own way (`optim/precision.py`, `optim/offload.py`): its
    config, name, hooks and loop state are the inner technique's; subclasses write `build_optimizer` and the
    memory story (`transform_spec`, `estimate`)."""

    def __init__(self, inner: OptimizerTechnique) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.name = inner.name

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown):
        return self.inner.step_phases(spec, breakdown)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def check(self, ctx: Context) -> None:
        self.inner.check(ctx)

    def apply(self, ctx: Context) -> None:
        self.inner.apply(ctx)

    def wrap_loss(self, loss_fn, ctx: Context):
        return self.inner.wrap_loss(loss_fn, ctx)

    def wrap_forward_backward(self, fb, ctx: Context):
        return self.inner.wrap_forward_backward(fb, ctx)

    def on_step_start(self, ctx: Context) -> None:
        self.inner.on_step_start(ctx)

    def on_step_end(self, ctx: Context, metrics: dict) -> None:
        self.inner.on_step_end(ctx, metrics)
