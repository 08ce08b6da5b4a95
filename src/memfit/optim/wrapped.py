"""`WrappedOptimizer`: an optimizer that runs another one its own way (layer-wise in backward, one parameter at a
time on an fp32 view) and shows the loop, LR schedules and checkpoints the wrapped optimizer's groups and state."""

from __future__ import annotations

import torch


class WrappedOptimizer(torch.optim.Optimizer):
    """Delegates `param_groups`, `state`, `defaults` and `zero_grad` to `self.optimizer`; subclasses write `step`
    (and `state_dict` / `load_state_dict` for what they keep themselves)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        # Optimizer.__init__ is not called: groups, defaults and state are the wrapped optimizer's
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}

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
