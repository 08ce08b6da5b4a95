"""`memfit bench pruning` rows: the reloaded pruned model is what gets scored, and the sizes add up."""

from __future__ import annotations

from memfit.bench.harness import BenchOptions
from memfit.bench.suites import pruning


def test_rows_score_the_reloaded_folder(model_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_INFERENCE_MODEL", str(model_dir))
    only = ["slicegpt-0.5", "flap-nobias-0.0", "flap-nobias-0.5"]
    opts = BenchOptions(quick=True, out_dir=tmp_path, data_dir=data_dir, only=only)
    rows = {(r["method"], r["sparsity"]): r for r in pruning.rows(opts)}
    assert set(rows) == {("dense", 0.0), ("slicegpt", 0.5), ("flap-nobias", 0.0), ("flap-nobias", 0.5)}
    dense, sliced = rows["dense", 0.0], rows["slicegpt", 0.5]
    assert sliced["shape"].startswith("h32 ") and sliced["params"] < 0.6 * dense["params"]
    assert sliced["weight_mib"] == sliced["params"] * 4 / 2**20 < sliced["file_mib"]  # + the safetensors header
    assert sliced["reload_diff"] == 0 and sliced["kl_vs_dense"] > 0
    unpruned = rows["flap-nobias", 0.0]
    assert unpruned["params"] == dense["params"] and abs(unpruned["ppl"] - dense["ppl"]) < 1e-9
    assert unpruned["kl_vs_dense"] < 1e-9
    assert rows["flap-nobias", 0.5]["params"] < 0.7 * dense["params"]
