"""Exact bytes of a tiny Llama AdamW step: parameters, gradients, optimizer state, measured == estimated."""

from __future__ import annotations

import pytest
import torch

from memfit.memory.estimate import estimate_run, step_peak
from memfit.memory.measure import MemoryMeter
from memfit.optim.adamw import AdamWTechnique
from memfit.techniques.base import Context

from .conftest import batch_for, spec_for, tiny_llama


def _step(model, optimizer, batch, meter):
    with meter.region():
        loss = model(**batch).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_adamw_step_bytes_are_exact_and_match_the_estimate():
    model = tiny_llama()
    spec = spec_for(model, "causal_lm", 2, 64, "fp32", "sdpa")
    tech = AdamWTechnique()
    optimizer = tech.build_optimizer(Context(model=model, spec=spec))
    batch = batch_for(model, "causal_lm", 2, 64)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)

    meter = MemoryMeter(model, optimizer)
    _step(model, optimizer, batch, meter)
    state_after_first = meter.current().optimizer
    _step(model, optimizer, batch, meter)  # second step: state exists before the step starts
    report = meter.report()
    est = estimate_run(spec, [tech])

    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    assert report.category_peaks.parameters == 4 * n_params == est.parameters
    assert report.category_peaks.gradients == 4 * n_params == est.gradients
    assert state_bytes == 8 * n_params + 4 * len(params) == est.optimizer  # two moments + fp32 `step` counters
    assert state_after_first == meter.current().optimizer == state_bytes
    assert report.peak.optimizer == state_bytes  # the step peaks in backward, with the state alive
    # the whole step's tensor peak is predicted to a few per cent (phases, not the sum of category peaks)
    assert abs(report.tensor_peak / step_peak(spec, est) - 1) < 0.05
    assert report.tensor_peak < est.total


def test_estimate_run_applies_the_optimizer_technique_only_to_its_category():
    model = tiny_llama()
    spec = spec_for(model, "causal_lm", 2, 64, "fp32", "sdpa")
    base = estimate_run(spec, [])
    with_adamw = estimate_run(spec, [AdamWTechnique()])
    assert base.optimizer == 0
    assert with_adamw.with_(optimizer=0) == base


@pytest.mark.parametrize("fused", [True, False])
def test_step_transients_measured_equal_the_estimate(fused):
    """The fused kernel makes no temporaries; the for-loop one two of the largest parameter's size."""
    from memfit.memory.estimate import optimizer_step_transients
    from memfit.optim.adamw import AdamWConfig

    model = tiny_llama()
    spec = spec_for(model, "causal_lm", 2, 64, "fp32", "sdpa")
    tech = AdamWTechnique(AdamWConfig(name="adamw", fused=fused))
    optimizer = tech.build_optimizer(Context(model=model, spec=spec))
    batch = batch_for(model, "causal_lm", 2, 64)
    model(**batch).loss.backward()
    optimizer.step()  # the state exists before the measured step
    meter = MemoryMeter(model, optimizer)
    with meter.region():
        optimizer.step()
    report = meter.report()
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    held = report.peak.parameters + report.peak.buffers + report.peak.gradients + state
    spec = tech.transform_spec(spec)
    expected = optimizer_step_transients(spec, estimate_run(spec, [tech]))
    assert report.tensor_peak - held == expected
    assert (expected == 0) == fused
