import pytest

from memfit.activations.checkpointing import select_targets
from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .conftest import (
    assert_grads_close,
    grads_of,
    hf_loss,
    make_batch,
    make_model,
    measured_activations,
)


def _apply(model, **opts):
    tech = build_technique("activations", {"name": "checkpointing", **opts})
    ctx = Context(model=model, spec=RunSpec.from_model(model))
    tech.check(ctx)
    tech.apply(ctx)
    return tech


@pytest.mark.parametrize("opts", [{}, {"every": 2}, {"modules": ["LlamaMLP"]},
                                  {"modules": ["LlamaAttention", "LlamaMLP"], "every": 1}])
def test_gradients_equal_baseline(opts):
    batch = make_batch()
    ref_loss, ref = grads_of(make_model(), hf_loss, batch)
    model = make_model()
    _apply(model, **opts)
    loss, got = grads_of(model, hf_loss, batch)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert_grads_close(got, ref)


def test_selection():
    model = make_model("llama-1m")
    assert len(select_targets(model)) == 4
    assert len(select_targets(model, every=2)) == 2
    mlps = select_targets(model, every=2, modules=["LlamaMLP"])
    assert [type(m).__name__ for m in mlps] == ["LlamaMLP", "LlamaMLP"]


def test_unknown_module_type_is_a_config_error():
    with pytest.raises(ConfigError, match="LlamaMoE.*available types.*LlamaMLP"):
        _apply(make_model(), modules=["LlamaMoE"])
    with pytest.raises(ConfigError, match="every"):
        build_technique("activations", {"name": "checkpointing", "every": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        build_technique("activations", {"name": "checkpointing", "layers": 3})


@pytest.mark.parametrize("opts", [{}, {"every": 2}, {"modules": ["LlamaMLP"]}])
def test_measured_activations_match_estimate(opts):
    batch = make_batch(2, 64)
    model = make_model()
    tech = _apply(model, **opts)
    measured = measured_activations(model, hf_loss, batch)
    est = estimate_run(RunSpec.from_model(model, batch=2, seq=64), [tech]).activations
    assert abs(measured / est - 1) < 0.15, (measured, est)
    baseline = measured_activations(make_model(), hf_loss, batch)
    assert measured < (0.6 if not opts else 0.9) * baseline
