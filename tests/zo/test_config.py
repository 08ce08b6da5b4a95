"""Bad zeroth-order configurations fail with one clear ConfigError."""

from __future__ import annotations

import pytest
import torch

from memfit.errors import ConfigError
from memfit.techniques.base import Technique
from memfit.techniques.registry import build_technique
from memfit.zo.mezo import ZOSGD

from .helpers import ALL_VARIANTS, lm_batch, technique_and_step, tiny_model


@pytest.mark.parametrize("name", ALL_VARIANTS)
@pytest.mark.parametrize("eps", [0.0, -1e-3])
def test_non_positive_eps_is_rejected(name, eps):
    with pytest.raises(ConfigError, match="eps"):
        build_technique("step", {"name": name, "eps": eps})


def test_unknown_variant_names_the_choices():
    with pytest.raises(ConfigError, match="mezo"):
        build_technique("step", {"name": "zo-sgd-nesterov"})


def test_unknown_option_is_rejected():
    with pytest.raises(ConfigError, match="allowed keys"):
        build_technique("step", {"name": "mezo", "epsilon": 1e-3})


class NeedsBackprop(Technique):
    name = "checkpointing"
    slot = "activations"
    needs_gradients = True


def _ctx_with(t, *others):
    from memfit.memory.spec import RunSpec
    from memfit.techniques.base import Context

    model = tiny_model()
    return Context(model=model, spec=RunSpec.from_model(model), techniques=[t, *others])


def test_zo_with_a_backprop_technique_is_rejected():
    t = build_technique("step", "mezo")
    with pytest.raises(ConfigError, match="needs backprop"):
        t.check(_ctx_with(t, NeedsBackprop()))


def test_zo_with_a_non_default_optimizer_is_rejected():
    t = build_technique("step", "zo-adam")
    t.check(_ctx_with(t, build_technique("optimizer", "adamw")))  # the untouched default is fine
    with pytest.raises(ConfigError, match="own optimizer"):
        t.check(_ctx_with(t, build_technique("optimizer", {"name": "adamw", "lr": 0.1})))


def test_forward_gradient_needs_a_differentiable_objective():
    t = build_technique("step", {"name": "forward-grad", "objective": "accuracy"})
    with pytest.raises(ConfigError, match="not differentiable"):
        t.check(_ctx_with(t))


def test_model_without_trainable_parameters_is_rejected():
    t = build_technique("step", "mezo")
    ctx = _ctx_with(t)
    ctx.model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable"):
        t.check(ctx)


def test_optimizer_level_errors():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ConfigError, match="eps"):
        ZOSGD(p, eps=0.0)
    with pytest.raises(ConfigError, match="n_spsa"):
        ZOSGD(p, n_spsa=0)
    with pytest.raises(ConfigError, match="closure"):
        ZOSGD(p).step()


def test_step_technique_runs_without_a_loss_fn_in_context():
    model, batch = tiny_model(), lm_batch()
    _, _, step = technique_and_step("mezo", model, batch)
    assert step([batch]) > 0
