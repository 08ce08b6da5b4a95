"""The meter leans on torch's private MemTracker: a torch that moves what it overrides must fail loudly."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from memfit.errors import CompatError
from memfit.memory import measure
from memfit.memory.measure import MemoryMeter


def _step(model: torch.nn.Module, meter: MemoryMeter) -> None:
    x = torch.randn(4, 8, requires_grad=True)
    with meter.region():
        model(x).sum().backward()


def test_gradient_hook_swap_is_counted_and_measures():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    meter = MemoryMeter(model)
    _step(model, meter)
    report = meter.report()
    assert report.peak.parameters > 0 and report.category_peaks.gradients > 0


def test_a_swap_torch_no_longer_calls_is_a_compat_error(monkeypatch):
    @contextmanager
    def ignored():  # what happens when ModTracker stops calling its module-level name
        yield measure._HookCount()

    monkeypatch.setattr(measure, "_leak_free_module_hooks", ignored)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    with pytest.raises(CompatError, match=r"register_multi_grad_hook.*torch \d"):
        _step(model, MemoryMeter(model))


@pytest.mark.parametrize("name", ["_update_snap", "_pre_bw_hook", "_track_module_params_and_buffers"])
def test_missing_private_method_is_a_compat_error(monkeypatch, name):
    monkeypatch.delattr(MemTracker, name)
    with pytest.raises(CompatError, match=f"MemTracker lacks {name}"):
        MemoryMeter(torch.nn.Linear(2, 2))
