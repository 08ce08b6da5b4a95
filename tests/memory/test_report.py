"""MemoryReport serialisation and rendering, process peak, and measuring a no-op."""

from __future__ import annotations

import json

import torch
from rich.console import Console

from memfit.memory.estimate import baseline, step_peak
from memfit.memory.measure import MemoryMeter, MemoryReport, measure

from .conftest import batch_for, forward_backward, spec_for, tiny_llama


def _report():
    model = tiny_llama()
    report, _ = forward_backward(model, batch_for(model, "causal_lm", 2, 64), "fp32", MemoryMeter(model))
    return model, report


def test_json_round_trip_and_table():
    model, report = _report()
    again = MemoryReport.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()
    assert again.peak == report.peak and again.category_peaks == report.category_peaks
    console = Console(record=True, width=120)
    spec = spec_for(model, "causal_lm", 2, 64, "fp32", "sdpa")
    est = baseline(spec)
    console.print(report.table(estimate=est, estimate_peak=step_peak(spec, est)))
    text = console.export_text()
    for word in ("parameters", "gradients", "activations", "tensor total", "process peak", "estimate", "max/est"):
        assert word in text
    gradients_row = next(line for line in text.splitlines() if "gradients" in line)
    assert "1.00" in gradients_row  # the category max is compared with the category estimate


def test_process_peak_covers_tensor_peak_on_cpu():
    _, report = _report()
    assert report.process_peak is not None
    assert report.process_peak >= report.tensor_peak > 0
    assert report.overhead == report.process_peak - report.tensor_peak


def test_measure_a_noop_and_a_plain_tensor_op():
    result, report = measure(lambda: None)
    assert result is None and report.tensor_peak == 0
    x = torch.ones(1000)
    y, report = measure(lambda: x * 2, x)
    assert torch.equal(y, x * 2)
    assert report.peak.activations == 4000 and report.peak.other == 4000
