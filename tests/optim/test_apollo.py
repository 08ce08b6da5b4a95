"""APOLLO / APOLLO-Mini: parity with apollo-torch, estimate == measured state, bad config."""

from __future__ import annotations

import pytest

from memfit.errors import ConfigError
from memfit.memory.estimate import baseline
from memfit.memory.spec import RunSpec
from memfit.optim.apollo import APOLLOAdamW
from memfit.optim.common import split_groups, state_bytes
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .helpers import batches, max_param_diff, measured_state, reference_groups, shared_projection_parity, tiny, train

apollo_torch = pytest.importorskip("apollo_torch")


@pytest.mark.parametrize("rank, scale, scale_type, lr", [(8, 1.0, "channel", 1e-2), (1, 128.0, "tensor", 1e-3)])
def test_parity_with_apollo_torch_same_projection(rank, scale, scale_type, lr):
    """Same updates as apollo-torch's APOLLOAdamW over 6 steps (3 refreshes), given the same random projection:
    the reference is handed memfit's Gaussian matrices in call order; scaling, limiter, moments are its own."""
    from apollo_torch import random_projector

    diff = shared_projection_parity(
        APOLLOAdamW,
        lambda cls, m: cls(split_groups(m, 0.1), lr=lr, rank=rank, update_proj_gap=2, scale=scale,
                           scale_type=scale_type, weight_decay=0.1),
        lambda m: apollo_torch.APOLLOAdamW(reference_groups(split_groups(m, 0.1), rank=rank, update_proj_gap=2,
                                                            scale=scale, proj_type="std", proj="random",
                                                            scale_type=scale_type), lr=lr),
        random_projector.GradientProjector)
    assert diff < 1e-5


def test_projection_is_seeded_and_refreshed():
    a, b = tiny(), tiny()
    oa = APOLLOAdamW(split_groups(a, 0.0), rank=4, update_proj_gap=2, seed=7)
    ob = APOLLOAdamW(split_groups(b, 0.0), rank=4, update_proj_gap=2, seed=7)
    data = batches(3)
    train(a, oa, data[:1])
    p = oa.param_groups[0]["params"][0]
    first = oa.state[p]["projection_seed"]
    train(a, oa, data[1:])
    train(b, ob, data)
    assert max_param_diff(a, b) == 0.0
    assert first != oa.state[p]["projection_seed"]  # refreshed at step 2 with a new seed
    assert "projection" not in oa.state[p]  # regenerated from the seed, never stored


@pytest.mark.parametrize("options", [{"name": "apollo", "rank": 8}, {"name": "apollo_mini"},
                                     {"name": "apollo", "rank": 4, "norm_growth_limit": None}])
def test_estimate_equals_measured_state(options):
    model = tiny()
    technique = build_technique("optimizer", options)
    spec = RunSpec.from_model(model, batch=2, seq=16)
    opt = technique.build_optimizer(Context(model=model, spec=spec))
    measured = measured_state(model, opt)
    assert measured == state_bytes(opt) == technique.estimate(spec, baseline(spec)).optimizer


@pytest.mark.parametrize("bad, match", [({"rank": 0}, "rank"), ({"rank": 100}, "min"),
                                        ({"update_proj_gap": -1}, "update_proj_gap"),
                                        ({"proj_type": "up"}, "proj_type"), ({"scale_type": "row"}, "scale_type")])
def test_bad_hyper_parameters_raise_config_error(bad, match):
    model = tiny()
    with pytest.raises(ConfigError, match=match):
        build_technique("optimizer", {"name": "apollo", "rank": 8, **bad}).build_optimizer(
            Context(model=model, spec=RunSpec.from_model(model)))
    with pytest.raises(ConfigError, match=match):
        APOLLOAdamW(split_groups(model, 0.0), **{"rank": 8, **bad})
