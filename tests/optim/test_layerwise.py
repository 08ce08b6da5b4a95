"""Layer-wise (in-backward) updates: same updates as the ordinary optimizer (with accumulation), gradient memory
of one parameter, exact resume, LR schedulers, deferred clipping, and the technique/loop surface."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from memfit.memory.estimate import baseline
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.optim.common import split_groups
from memfit.optim.galore import GaLoreAdamW
from memfit.optim.layerwise import LayerwiseOptimizer, make_layerwise
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .helpers import batches, loss_of, max_param_diff, tiny, train


def _train_layerwise(model, opt: LayerwiseOptimizer, data, accum: int = 1) -> None:
    for i in range(0, len(data), accum):
        chunk = data[i:i + accum]
        for j, ids in enumerate(chunk):
            opt.set_accumulating(j < len(chunk) - 1)
            (loss_of(model, ids) / len(chunk)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


FACTORIES = {
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=False),
    "galore": lambda groups: GaLoreAdamW(groups, lr=1e-2, rank=8, update_proj_gap=2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("accum", [1, 2])
def test_updates_equal_ordinary_optimizer(name, accum):
    a, b = tiny(), tiny()
    ordinary = FACTORIES[name](split_groups(a, 0.1))
    layerwise = make_layerwise(FACTORIES[name], b, param_groups=split_groups(b, 0.1))
    data = batches(4 * accum)
    train(a, ordinary, data, accum=accum)
    _train_layerwise(b, layerwise, data, accum=accum)
    assert max_param_diff(a, b) < 1e-6
    assert all(p.grad is None for p in b.parameters())


def test_peak_gradient_bytes_is_one_parameter():
    def peak_gradients(layerwise: bool) -> int:
        model = tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        if layerwise:
            opt = make_layerwise(opt, model)
        meter = MemoryMeter(model, opt)
        for ids in batches(2):
            with meter.region():
                loss_of(model, ids).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return meter.report().category_peaks.gradients

    model = tiny()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    fused, ordinary = peak_gradients(True), peak_gradients(False)
    assert ordinary == everything
    assert largest <= fused <= largest * 1.01
    spec = RunSpec.from_model(model)
    tech = build_technique("optimizer", {"name": "galore", "rank": 8, "layerwise": True})
    assert tech.estimate(spec, baseline(spec)).gradients == largest


def test_state_dict_resume_and_lr_scheduler():
    a = tiny()
    opt = make_layerwise(FACTORIES["galore"], a, param_groups=split_groups(a, 0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    data = batches(6)
    for ids in data[:3]:
        _train_layerwise(a, opt, [ids])
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    b = copy.deepcopy(a)
    opt_b = make_layerwise(FACTORIES["galore"], b, param_groups=split_groups(b, 0.1))
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train_layerwise(a, opt, data[3:])
    _train_layerwise(b, opt_b, data[3:])
    assert max_param_diff(a, b) == 0.0


def test_deferred_clipping_uses_previous_step_norm():
    """Step 1 unclipped; step 2 gradients scaled by max_norm / norm(step 1) — checked against a manual loop."""
    a, b = tiny(), tiny()
    max_norm = 0.5
    data = batches(3)
    ordinary = torch.optim.SGD(a.parameters(), lr=0.1)
    previous = None
    for ids in data:
        loss_of(a, ids).backward()
        norm = math.sqrt(sum(float(p.grad.square().sum()) for p in a.parameters()))
        if previous is not None and max_norm / (previous + 1e-6) < 1:
            for p in a.parameters():
                p.grad.mul_(max_norm / (previous + 1e-6))
        previous = norm
        ordinary.step()
        ordinary.zero_grad()
    fused = make_layerwise(torch.optim.SGD(b.parameters(), lr=0.1), b, max_grad_norm=max_norm)
    assert fused.clips_in_backward
    _train_layerwise(b, fused, data)
    assert fused.last_grad_norm == pytest.approx(previous, rel=1e-5)
    assert max_param_diff(a, b) < 1e-6


def test_loop_surface_with_context_factory():
    """The run loop calls `make_layerwise(lambda c: technique.build_optimizer(c), ctx)`."""
    model = tiny()
    tech = build_technique("optimizer", {"name": "apollo", "rank": 4, "layerwise": True})
    ctx = Context(model=model, spec=RunSpec.from_model(model), grad_clip=1.0)
    opt = make_layerwise(lambda c: tech.build_optimizer(c), ctx)
    assert isinstance(opt, torch.optim.Optimizer) and opt.max_grad_norm == 1.0
    before = [p.detach().clone() for p in model.parameters()]
    _train_layerwise(model, opt, batches(2))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_hooks_that_never_fire_are_a_compat_error():
    """If torch stopped calling post-accumulate-grad hooks, step() must refuse instead of skipping the update."""
    from memfit.errors import CompatError

    model = tiny()
    opt = make_layerwise(lambda groups: torch.optim.AdamW(groups, lr=1e-2), model)
    for handle in opt._handles:
        handle.remove()  # registered, but no longer called
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(CompatError, match=r"still hold their gradient.*torch \d"):
        opt.step()
