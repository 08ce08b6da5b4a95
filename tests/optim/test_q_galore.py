import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.models import build_llama
from memfit.optim import q_galore as qg
from memfit.optim.common import state_bytes
from memfit.optim.galore import GaLoreAdamW
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.train.build import apply_techniques, build_optimizer, wrap_forward_backward


def test_stochastic_rounding_is_unbiased_where_nearest_rounding_loses_the_update():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    codes, scale = qg.sr_quantize(w, 32, torch.Generator().manual_seed(0))
    w0 = qg.dequantize_int8(codes, scale)
    step = scale.repeat_interleave(32, dim=1)
    groups = w0.view(8, 2, 32)
    keep = torch.ones_like(groups).scatter_(-1, groups.abs().argmax(-1, keepdim=True), 0).view(8, 64)
    w1 = w0 - 0.1 * step * w0.sign() * keep  # a tenth of a step towards zero; each group's absmax (scale) kept
    draws = torch.stack([qg.dequantize_int8(*qg.sr_quantize(w1, 32, torch.Generator().manual_seed(s)))
                         for s in range(4000)])
    se = draws.std(0) / 4000 ** 0.5
    assert ((draws.mean(0) - w1).abs() <= 5 * se + 1e-6 * w1.abs()).all()
    assert ((draws - w1).abs() <= step * (1 + 1e-5)).all()  # one step of error at most
    nearest = torch.round(w1 / step) * step
    assert torch.equal(nearest, w0)  # round-to-nearest erases the update entirely ...
    assert (draws.mean(0) - w0).abs().mean() > 0.05 * step.mean()  # ... stochastic rounding keeps it on average


def _model(seed=0):
    model = build_llama("llama-tiny", 256, seed=seed)
    model.train()
    return model


def _setup(model, **opts):
    spec = RunSpec.from_model(model, batch=2, seq=32)
    tech = build_technique("optimizer", {"name": "q_galore", "rank": 8, "lr": 1e-2, **opts})
    ctx = Context(model=model, spec=spec, techniques=[tech])
    apply_techniques(ctx)
    opt = build_optimizer(tech, ctx)
    ctx.optimizer = opt
    return spec, tech, opt, wrap_forward_backward(ctx)


def _batch(seed=1):
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_update_equals_galore_8bit_on_the_dequantized_weight(monkeypatch):
    """The fp32 weight Q-GaLore rounds is exactly GaLore-8bit's step from the dequantized weight with the same
    (int4-dequantized) projector: the published algorithm, then stochastic rounding."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    layer = qg.Int8Linear(lin, 32, torch.Generator().manual_seed(0))
    opt = qg.QGaLore([], [("q", layer)], lr=0.05, rank=4, update_proj_gap=3, scale=0.5, weight_decay=0.01,
                     weight_group_size=32)
    ref_w = torch.nn.Parameter(layer.weight().clone())
    ref = GaLoreAdamW([{"params": [ref_w]}], lr=0.05, rank=4, update_proj_gap=3, scale=0.5, weight_decay=0.01,
                      quantize=True, min_8bit_size=0)
    seen = []
    real = qg.sr_quantize
    monkeypatch.setattr(qg, "sr_quantize", lambda w, g, gen=None: (seen.append(w.clone()), real(w, g, gen))[1])
    ref._new_basis = lambda grad, group, side, seed: opt._load_basis(opt.state[layer.codes])
    ref.defaults["align_signs"] = ref.param_groups[0]["align_signs"] = False
    opt.int8_group["align_signs"] = False
    for step in range(5):
        grad = torch.randn(48, 64)
        before = layer.weight()
        layer.update(grad)
        with torch.no_grad():
            ref_w.copy_(before)
        ref_w.grad = grad
        ref.step()
        torch.testing.assert_close(seen[-1], ref_w.detach(), rtol=1e-6, atol=1e-7)


def test_memory_estimate_equals_measured_and_beats_galore_8bit():
    model = _model()
    spec, tech, opt, fb = _setup(model, min_8bit_size=0)
    meter = MemoryMeter(model, opt)
    for i in range(3):
        meter = MemoryMeter(model, opt)
        with meter.region():
            fb(model, _batch(i), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    got = meter.report().category_peaks
    est = estimate_run(spec, [tech])
    assert got.parameters == est.parameters
    assert got.gradients == est.gradients
    assert state_bytes(opt) == est.optimizer
    assert got.temporaries <= est.temporaries
    g8 = estimate_run(spec, [build_technique("optimizer", {"name": "galore_8bit", "rank": 8, "min_8bit_size": 0})])
    assert est.parameters + est.gradients + est.optimizer < 0.6 * (g8.parameters + g8.gradients + g8.optimizer)


def test_training_lowers_the_loss():
    model = _model()
    _, _, opt, fb = _setup(model, update_proj_gap=4)
    batch = _batch()
    losses = []
    for _ in range(12):
        losses.append(fb(model, batch, 1.0).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 1.0


def test_lazy_refresh_grows_the_gap_of_stable_layers_only():
    torch.manual_seed(0)
    stable = qg.Int8Linear(torch.nn.Linear(32, 32, bias=False), 32)
    moving = qg.Int8Linear(torch.nn.Linear(32, 32, bias=False), 32)
    opt = qg.QGaLore([], [("stable", stable), ("moving", moving)], lr=1e-3, rank=2, update_proj_gap=1,
                     cos_threshold=0.9, queue_size=2, gamma=2, weight_group_size=32)
    fixed = torch.randn(32, 2) @ torch.randn(2, 32)  # rank 2: the same subspace every step
    for _ in range(12):
        stable.update(fixed)
        moving.update(torch.randn(32, 32))
    assert opt.state[stable.codes]["gap"] >= 4
    assert opt.state[moving.codes]["gap"] == 1


@pytest.mark.parametrize("opts,spec_kw,match", [
    ({"rank": 1000}, {}, "rank"),
    ({"layerwise": True}, {}, "inside backward"),
    ({}, {"grad_accum": 2}, "accumulate"),
])
def test_bad_options_raise_config_error(opts, spec_kw, match):
    model = _model()
    tech = build_technique("optimizer", {"name": "q_galore", **opts})
    with pytest.raises(ConfigError, match=match):
        apply_techniques(Context(model=model, spec=RunSpec.from_model(model, **spec_kw), techniques=[tech]))


def test_refuses_adapters():
    model = _model()
    techs = [build_technique("adapter", {"name": "lora", "r": 2}), build_technique("optimizer", "q_galore")]
    with pytest.raises(ConfigError, match="int8"):
        apply_techniques(Context(model=model, spec=RunSpec.from_model(model), techniques=techs))


def test_state_dict_resume_is_exact():
    import copy

    model = _model()
    _, _, opt, fb = _setup(model, update_proj_gap=2, min_8bit_size=0)
    for i in range(3):
        fb(model, _batch(i), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    fb(model, _batch(9), 1.0)
    opt.step()
    want = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = _model(seed=1)
    _, _, fresh_opt, fresh_fb = _setup(fresh, update_proj_gap=2, min_8bit_size=0)
    fresh.load_state_dict(model_state)
    fresh_opt.load_state_dict(opt_state)
    fresh_fb(fresh, _batch(9), 1.0)
    fresh_opt.step()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_bf16_true_gradients_are_the_float_parameters_only(data_dir):
    """Under bf16-true the precision wrapper steps q_galore's float parameters; the int8 layers still update inside
    backward with no gradient kept, so the estimate keeps q_galore's gradient story (the float parameters' in bf16),
    not every parameter's (3.4× the measured gradients before)."""
    from memfit.bench.technique_matrix import matrix_recipe, measure_recipe

    recipe = matrix_recipe("adamw", "bf16-true", data_dir)
    recipe["optimizer"] = {"name": "q_galore", "rank": 8, "lr": 1e-2, "min_8bit_size": 0}
    row = measure_recipe(recipe)
    assert "crash" not in row and "refused" not in row, row
    assert row["gradients_measured"] == row["gradients_estimate"], row
    assert row["optimizer_measured"] == row["optimizer_estimate"], row
