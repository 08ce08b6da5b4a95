"""Technique × precision on a tiny Llama, each built and run for real (`bench/technique_matrix.py`): measured bytes
per category equal the estimate, the step peak is never more than 2 % above the prediction, and a combination
memfit cannot run is one clear refusal (issue 13, item 2)."""

from __future__ import annotations

import pytest

from memfit.bench.technique_matrix import PRECISION_NAMES, TECHNIQUES, matrix_recipe, measure_recipe

EXACT = {"adamw", "adamw-master", "adamw-state-bf16", "adamw_8bit", "galore", "lomo", "sgd", "lora", "qlora", "lisa",
         "badam", "mezo"}
"""Families whose activations alive after the forward equal the estimate to the byte (checkpointing's activation
estimate is the category's peak, during a layer's recompute, not what is alive after the forward)."""

REFUSED = {("adamw-master", p) for p in ("32-true", "bf16-mixed", "16-mixed")} | {("lomo", "16-mixed")}
"""master_weights applies to 16-bit weights only; 16-mixed skips steps an in-backward update has already made."""

CASES = sorted({(t, p) for t in TECHNIQUES for p in ("32-true", "bf16-true")}
               | {(t, p) for t in ("adamw", "lora", "qlora") for p in PRECISION_NAMES}
               | {("adamw-master", "16-true"), ("adamw-master", "bf16-mixed"), ("lomo", "16-mixed"),
                  ("mezo", "bf16-mixed")})


@pytest.mark.parametrize("technique,precision", CASES)
def test_measured_equals_estimate(technique, precision, data_dir):
    row = measure_recipe(matrix_recipe(technique, precision, data_dir))
    assert "crash" not in row, row
    if (technique, precision) in REFUSED:
        assert "refused" in row and "\n" not in row["refused"]
        return
    assert "refused" not in row, row
    assert row["parameters_ratio"] == row["gradients_ratio"] == 1.0, row
    assert abs(row["optimizer_ratio"] - 1) <= 1e-3, row
    assert row["step_peak_ratio"] <= 1.02, row
    assert abs(row["step_peak_ratio"] - 1) <= 0.05, row
    if technique in EXACT:
        assert row["activations_ratio"] == 1.0, row


FROZEN = ("lora", "qlora", "lisa", "badam")
"""The techniques whose activation estimates follow where gradients flow (frozen weights, blocks below every trained
one): a second shape, four blocks, batch 3. (Their step peak there is within 5 % but up to 4.5 % above the
prediction under bf16-mixed: a backward-phase transient not modelled yet, see docs/benchmarks.md.)"""


@pytest.mark.parametrize("technique", FROZEN)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_second_shape(technique, precision, data_dir):
    row = measure_recipe(matrix_recipe(technique, precision, data_dir, preset="llama-1m", batch_size=3))
    assert "refused" not in row and "crash" not in row, row
    assert row["activations_ratio"] == 1.0, row
    assert abs(row["step_peak_ratio"] - 1) <= 0.05, row


MORE = [("switchlora", "32-true"), ("switchlora", "bf16-mixed"), ("s2a", "bf16-mixed"), ("s2a", "bf16-true"),
        ("mesa", "bf16-mixed"), ("mesa", "32-true"), ("peqa", "32-true"), ("peqa", "bf16-mixed"),
        ("dora", "32-true")]
"""Techniques outside the matrix whose step peak was once above the prediction: SwitchLoRA under autocast (its
projections returned fp32: 1.10×), S2A under bf16-mixed (the packed weight casts, the quantizer's fp32 scratch and
the forward's KV cache beside the packed layers were not modelled: 1.06×); PEQA's top-MLP scale-gradient
transients (exact here; 1.04× on GPT-2, tests/weights/test_qlora.py)."""


@pytest.mark.parametrize("technique,precision", MORE)
def test_more_techniques_step_peak(technique, precision, data_dir):
    row = measure_recipe(matrix_recipe(technique, precision, data_dir))
    assert "refused" not in row and "crash" not in row, row
    assert row["parameters_ratio"] == row["gradients_ratio"] == 1.0, row
    assert 0.95 <= row["step_peak_ratio"] <= 1.02, row
    if technique == "switchlora":  # LoRA's activation model, to the byte
        assert row["activations_ratio"] == 1.0, row
