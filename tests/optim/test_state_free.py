"""State-free baselines: SGD, LOMO and AdaLomo. Parity with the authors' `lomo-optim` package (updates, two-pass
norm clipping, value clipping), estimate == measured bytes per category, exact resume, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.estimate import baseline
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.optim.adalomo import AdaLomo
from memfit.optim.common import state_bytes
from memfit.optim.lomo import Lomo, fuse
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.train.step import make_forward_backward

from .helpers import batches, loss_of, max_param_diff, tiny, train

lomo_optim = pytest.importorskip("lomo_optim")

RULES = {"lomo": Lomo, "adalomo": AdaLomo}


def _reference(name: str, model, monkeypatch, **kwargs):
    if name == "adalomo":
        # the package allocates its state with `.cuda()`; on a CPU-only machine that call must be a no-op
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        return lomo_optim.AdaLomo(model, **kwargs)
    return lomo_optim.Lomo(model, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(RULES))
def test_updates_equal_reference(name, dtype, monkeypatch):
    """Five fused steps with weight decay on every parameter (the package's grouping): the same weights, in fp32 and
    in bf16 parameters (fp32 working copies written back). AdaLomo's reference runs with its default static loss
    scale 2**10, which memfit does not apply (no bits change)."""
    a, b = tiny().to(dtype), tiny().to(dtype)
    mine = fuse(RULES[name]([{"params": list(a.parameters())}], lr=1e-2, weight_decay=0.1))
    ref = _reference(name, b, monkeypatch, lr=1e-2, weight_decay=0.1)
    for ids in batches(5):
        loss_of(a, ids).backward()
        mine.step()
        mine.zero_grad(set_to_none=True)
        ref.fused_backward(loss_of(b, ids), 1e-2)
    assert max_param_diff(a, b) < 1e-7
    assert max_param_diff(a, tiny().to(dtype)) > 1e-3  # and they did train
    assert all(p.grad is None for p in a.parameters())


@pytest.mark.parametrize("name", list(RULES))
def test_two_pass_norm_clipping_equals_reference(name, monkeypatch):
    """`train.clip_grad_norm` under LOMO/AdaLomo: a norm pass, then the update pass with scaled (and value-clamped)
    gradients — the package's `grad_norm(loss)` + `fused_backward(loss, lr)`."""
    a, b = tiny(), tiny()
    max_norm, clip_value, lr = 0.3, 0.02, 1e-2
    tech = build_technique("optimizer", {"name": name, "lr": lr, "clip_grad_value": clip_value})
    ctx = Context(model=a, spec=RunSpec.from_model(a), grad_clip=max_norm)
    tech.check(ctx)
    ctx.optimizer = tech.build_optimizer(ctx)
    fb = tech.wrap_forward_backward(make_forward_backward(loss_of_batch, ctx.device, "fp32"), ctx)
    ref = _reference(name, b, monkeypatch, lr=lr, clip_grad_norm=max_norm, clip_grad_value=clip_value)
    coefs = []
    for ids in batches(4):
        fb(a, {"input_ids": ids}, 1.0)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        coefs.append(float(ctx.optimizer.optimizer.clip_coef))
        loss = loss_of(b, ids)
        ref.grad_norm(loss)
        ref.fused_backward(loss, lr)
    assert max(coefs) < 1.0  # clipping was active
    assert max_param_diff(a, b) < 1e-6


def loss_of_batch(model, batch):
    return loss_of(model, batch["input_ids"])


OPTIONS = [{"name": "sgd"}, {"name": "sgd", "momentum": 0.9}, {"name": "sgd", "momentum": 0.9, "layerwise": True},
           {"name": "lomo"}, {"name": "adalomo"}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_estimate_equals_measured(options):
    """Optimizer state after a step and the gradients' own peak, measured by MemoryMeter, equal the estimate."""
    from memfit.train.build import build_optimizer

    model = tiny()
    tech = build_technique("optimizer", options)
    spec = RunSpec.from_model(model, batch=2, seq=16)
    opt = build_optimizer(tech, Context(model=model, spec=spec))
    meter = MemoryMeter(model, opt)
    for ids in batches(2, seed=1):
        with meter.region():
            loss_of(model, ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    estimate = tech.estimate(spec, baseline(spec))
    assert meter.current().optimizer == state_bytes(opt) == estimate.optimizer
    grads = meter.report().category_peaks.gradients
    if options.get("layerwise", options["name"] != "sgd"):
        assert estimate.gradients == max(p.numel() * 4 for p in model.parameters())
        assert estimate.gradients <= grads <= 1.01 * estimate.gradients
    else:
        assert grads == estimate.gradients == sum(p.numel() * 4 for p in model.parameters())
    if options.get("momentum") or options["name"] == "adalomo":
        assert estimate.optimizer > 0


@pytest.mark.parametrize("options", [{"name": "adalomo", "lr": 1e-2, "weight_decay": 0.1},
                                     {"name": "sgd", "lr": 1e-2, "momentum": 0.9, "nesterov": True},
                                     {"name": "lomo", "lr": 1e-2}])
def test_resume_from_state_dict_is_exact(options):
    from memfit.train.build import build_optimizer

    def build(model):
        return build_optimizer(build_technique("optimizer", options), Context(model=model,
                                                                              spec=RunSpec.from_model(model)))

    a = tiny()
    opt_a = build(a)
    data = batches(5)
    train(a, opt_a, data[:3])
    b = copy.deepcopy(a)
    opt_b = build(b)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    train(a, opt_a, data[3:])
    train(b, opt_b, data[3:])
    assert max_param_diff(a, b) == 0.0


def test_adalomo_state_is_factored():
    model = tiny()
    opt = fuse(AdaLomo(model.parameters(), lr=1e-3))
    train(model, opt, batches(1))
    for p in model.parameters():
        shapes = {k: tuple(v.shape) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        assert shapes == ({"exp_avg_sq_row": p.shape[:1], "exp_avg_sq_col": p.shape[1:]} if p.dim() == 2
                          else {"exp_avg_sq": tuple(p.shape)})


def test_errors_and_hook_check():
    with pytest.raises(ConfigError, match="always update inside backward"):
        build_technique("optimizer", {"name": "lomo", "layerwise": False})
    with pytest.raises(ConfigError, match="nesterov"):
        build_technique("optimizer", {"name": "sgd", "nesterov": True})
    model = tiny()
    tech = build_technique("optimizer", {"name": "adalomo"})
    with pytest.raises(ConfigError, match="grad_accum"):
        tech.check(Context(model=model, spec=RunSpec.from_model(model, grad_accum=2), grad_clip=1.0))
    ctx = Context(model=model, spec=RunSpec.from_model(model))
    ctx.optimizer = tech.build_optimizer(ctx)
    fb = tech.wrap_forward_backward(make_forward_backward(loss_of_batch, ctx.device, "fp32"), ctx)
    ctx.optimizer.remove_hooks()  # as if torch stopped calling post-accumulate-grad hooks
    with pytest.raises(RuntimeError, match="no parameter was updated"):
        fb(model, {"input_ids": batches(1)[0]}, 1.0)


def test_lomo_trains_through_the_run_loop_with_clipping(data_dir):
    """The real loop: default `clip_grad_norm: 1.0` runs LOMO's two passes; the measured gradient category is one
    parameter's, as estimated."""
    from memfit.recipe import load_recipe
    from memfit.train import train as train_run

    from train.recipes import toy_recipe

    recipe = toy_recipe("pretrain", data_dir, steps=3, eval_every=0, measure_steps=1)
    recipe["optimizer"] = {"name": "lomo", "lr": 0.05}
    result = train_run(load_recipe(recipe), quiet=True)
    assert result.memory is not None
    assert result.estimate.gradients <= result.memory.category_peaks.gradients <= 1.01 * result.estimate.gradients
    assert result.optimizer_state_bytes == 0
