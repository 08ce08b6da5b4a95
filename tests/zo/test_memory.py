"""Measured memory of the zeroth-order steps: no gradients, only the variant's own state, inference-sized peak."""

from __future__ import annotations

import pytest
import torch

from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter

from .helpers import ALL_VARIANTS, lm_batch, technique_and_step, tiny_model


def inference_peak(model, batch) -> int:
    meter = MemoryMeter(model)
    with meter.region(), torch.no_grad():
        _ = model(**batch).loss
    return meter.report().peak.total


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_no_gradients_and_only_the_variants_own_state(name):
    model, batch = tiny_model(), lm_batch(4, 32)
    t, ctx, step = technique_and_step(name, model, batch, lr=1e-4)
    meter = MemoryMeter(model, ctx.optimizer)
    for _ in range(2):
        with meter.region():
            step([batch])
    report, est = meter.report(), estimate_run(ctx.spec, [t])
    assert report.category_peaks.gradients == 0 == est.gradients
    assert all(p.grad is None for p in model.parameters())
    assert meter.current().optimizer == est.optimizer  # persistent state between steps
    assert report.peak.optimizer == est.optimizer
    # only the update's chunk temporaries come on top, while the optimizer step runs
    assert report.category_peaks.optimizer - est.optimizer <= est.temporaries
    ratio = report.peak.total / est.total
    assert 0.75 < ratio < 1.33, (report.peak, est)


def test_mezo_step_peak_within_5_percent_of_inference_forward():
    model, batch = tiny_model(), lm_batch(4, 32)
    inference = inference_peak(model, batch)
    _, ctx, step = technique_and_step("mezo", model, batch, lr=1e-4, n_spsa=2)
    meter = MemoryMeter(model, ctx.optimizer)
    for _ in range(2):
        with meter.region():
            step([batch])
    peak = meter.report().peak.total
    assert peak <= 1.05 * inference, (peak, inference)


def test_backprop_peak_is_well_above_mezo():
    """The comparison the method exists for, on the same model and batch (AdamW after its first step)."""
    model, batch = tiny_model(), lm_batch(4, 32)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    meter = MemoryMeter(model, opt)
    for _ in range(2):
        with meter.region():
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    assert meter.report().peak.total > 2 * inference_peak(model, batch)
