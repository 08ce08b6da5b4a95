"""`memfit bench paper-tables`: each row becomes a recipe predicted on the meta device (CUDA facts), or says what
is missing; precisions memfit does not take yet are reported, not crashed on."""

from __future__ import annotations

import copy

import pytest

from memfit.bench.suites import paper_tables as pt

from .test_paper_tables import rows


def _row(row_id: str) -> dict:
    return copy.deepcopy(next(r for r in rows() if r["id"] == row_id))


def test_unsupported_precision_says_what_is_missing():
    row = _row("torchtune-llama3.2-3b-packed")
    if pt.memfit_precision("bf16-true") is not None:
        pytest.skip("bf16-true is supported now")
    out = pt.table_row(row)
    assert out["ratio"] is None and "needs precision bf16-true" in out["verdict"]
    assert out["vramcalc_gib"] == "67.65" and out["fitcheck_ratio"] == pytest.approx(83.23 / 60.0, abs=1e-3)


def test_a_row_memfit_can_express_is_predicted_and_compared_with_the_measure_it_names():
    row = _row("torchtune-llama3.2-3b-lora")
    row["precision"]["recipe"] = "bf16-mixed"  # a precision memfit takes today
    row["memfit_missing"] = []
    recipe, missing, approx = pt.express(row)
    assert not missing and recipe["train"]["device"] == "cuda" and recipe["adapter"]["name"] == "lora"
    predicted = pt.predict(recipe)
    assert predicted["tensors"] < predicted["reserved"] < predicted["device"]
    out = pt.table_row(row)
    assert out["measure"] == "active_bytes_peak"
    assert out["memfit_gib"] == pytest.approx(predicted["tensors"] / 2**30, abs=0.01)
    assert out["verdict"].endswith("%") or "approx" in out["verdict"]


def test_missing_features_are_named_and_approximations_stated():
    out = pt.table_row(_row("zo2-opt1.3b"))
    assert out["ratio"] is None and "offload.params-cpu-streaming" in out["verdict"]
    row = _row("qlora-guanaco-65b-48g")
    _, missing, approx = pt.express(row)
    assert not missing and any("paged" in a for a in approx) and any("512 tokens" in a for a in approx)


def test_summary_takes_the_median_over_measured_rows():
    fake = [{"id": "a", "kind": "measured_peak", "ratio": 1.1, "verdict": "+10%"},
            {"id": "b", "kind": "measured_peak", "ratio": 0.95, "verdict": "-5%"},
            {"id": "c", "kind": "measured_peak", "ratio": None, "verdict": "missing"},
            {"id": "d", "kind": "fits_on_card", "ratio": 0.5, "verdict": "fits"}]
    s = pt.summary(fake)
    assert s["median_abs_error"] == pytest.approx(0.075) and s["worst"].startswith("a") and s["claims_held"] == "1/1"
