"""`memfit bench cuda`: its grid, rows and predictions work without a GPU; the measurement runs only with one."""

from __future__ import annotations

import pytest
import torch

from memfit.bench.harness import BenchOptions
from memfit.bench.suites import cuda
from memfit.errors import ConfigError


def test_grid_and_predictions_without_a_gpu():
    full, quick = cuda.grid(False), cuda.grid(True)
    assert len(full) >= 30 and set(quick) < set(full)
    size, precision, technique = "llama-60m", "fp32", "lora r=16"
    predicted = cuda.predict(cuda.recipe(size, precision, technique))
    assert 0 < predicted["tensors"] < predicted["reserved"] < predicted["device"]
    plain = cuda.predict(cuda.recipe(size, precision, "adamw"))
    assert predicted["tensors"] < plain["tensors"]  # LoRA keeps no AdamW state for the base


def test_row_compares_each_measure_with_its_prediction():
    r = cuda.row({"allocated": 100 * 2**20, "reserved": 110 * 2**20, "device": 700 * 2**20},
                 {"tensors": 100 * 2**20, "reserved": 121 * 2**20, "device": 630 * 2**20}, size="s")
    assert r["allocated_ratio"] == 1.0 and r["reserved_ratio"] == 1.1 and r["device_ratio"] == 0.9
    assert r["size"] == "s" and r["device_meas_mib"] == 700.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the refusal is for machines without one")
def test_refuses_without_cuda(tmp_path):
    with pytest.raises(ConfigError, match="CUDA"):
        cuda.run(BenchOptions(quick=True, out_dir=tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_run_on_a_gpu(tmp_path):
    rows = cuda.run(BenchOptions(quick=True, out_dir=tmp_path, only=["adamw"]))
    measured = [r for r in rows if r.get("allocated_ratio")]
    assert measured and all(0.8 < r["allocated_ratio"] < 1.25 for r in measured)
