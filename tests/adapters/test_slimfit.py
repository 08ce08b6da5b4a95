import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.models import build_llama
from memfit.optim.common import state_bytes
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.train.build import apply_techniques, build_optimizer, wrap_forward_backward


def _run(bits, steps=6, interval=2, ratio=0.5, seed=0):
    model = build_llama("llama-tiny", 256, seed=seed, num_hidden_layers=4)
    model.train()
    spec = RunSpec.from_model(model, batch=2, seq=64)
    techs = [build_technique("adapter", {"name": "slimfit", "freeze_ratio": ratio, "interval": interval,
                                         "bits": bits}),
             build_technique("optimizer", {"name": "adamw", "lr": 1e-2})]
    ctx = Context(model=model, spec=spec, techniques=techs)
    apply_techniques(ctx)
    opt = build_optimizer(techs[1], ctx)
    ctx.optimizer = opt
    fb = wrap_forward_backward(ctx, loss_fn=lambda m, b: m(**b).loss)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    losses, report = [], None
    for step in range(steps):
        ctx.step = step
        techs[0].on_step_start(ctx)
        meter = MemoryMeter(model, opt)
        with meter.region():
            losses.append(fb(model, batch, 1.0).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        report = meter.report()
        techs[0].on_step_end(ctx, {})
    return techs, spec, opt, losses, report


def test_rounds_freeze_the_slowest_layers_by_measured_distance():
    techs, *_ = _run(None, steps=8, interval=2)
    sf = techs[0]
    assert sorted(sf.distance) == [0, 1, 2, 3]  # every layer trained once and was measured
    # the layers training now are the two that moved farthest in their last round
    ranked = sorted(sf.distance, key=lambda i: -sf.distance[i])
    assert sf.active == sorted(ranked[:2])
    assert sf.state_dict()["distance"] == {str(k): v for k, v in sf.distance.items()}


def test_frozen_layers_save_no_linear_inputs_estimate_equals_measured():
    techs, spec, opt, losses, report = _run(None)
    est = estimate_run(spec, techs)
    got = report.category_peaks
    assert abs(got.activations - est.activations) <= 64
    assert got.gradients == est.gradients
    assert state_bytes(opt) <= est.optimizer  # state of the layers that train now (the largest ones estimated)
    full = estimate_run(spec, [techs[1]])
    assert est.activations < full.activations and est.gradients < full.gradients


def test_frozen_layers_activations_quantized_within_bound():
    techs, spec, _, losses, report = _run(8)
    exact_techs, _, _, exact_losses, exact_report = _run(None)
    est = estimate_run(spec, techs)
    assert report.category_peaks.activations < exact_report.category_peaks.activations
    assert report.category_peaks.activations <= 1.06 * est.activations  # per-channel scales, small tensors
    assert techs[0].packed_bytes > 0
    assert losses[-1] < losses[0] - 0.5  # still trains
    # 8-bit saved activations of frozen layers change gradients only slightly: the losses track the exact run
    assert abs(losses[-1] - exact_losses[-1]) < 0.05 * exact_losses[-1]


@pytest.mark.parametrize("opts,match", [({"bits": 3}, "bits"), ({"freeze_ratio": 1.0}, "freeze_ratio")])
def test_bad_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        build_technique("adapter", {"name": "slimfit", **opts})


def test_refuses_activation_techniques_that_restore_the_same_tensors():
    model = build_llama("llama-tiny", 256, seed=0)
    techs = [build_technique("adapter", "slimfit"), build_technique("activations", "mesa")]
    with pytest.raises(ConfigError, match="mesa"):
        apply_techniques(Context(model=model, spec=RunSpec.from_model(model), techniques=techs))
