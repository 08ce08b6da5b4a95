import pytest
from typer.testing import CliRunner

from memfit.cli import app
from memfit.plan.generate import KV_OPTIONS, measure_plan, plan_generation


@pytest.mark.parametrize("pick", [lambda r: r.kv == "full" and r.weights.startswith("fp"),
                                  lambda r: r.kv == "h2o" and r.weights.startswith("fp"),
                                  lambda r: r.kv == "kivi" and r.kv_options["bits"] == 4 and r.weights == "int8"],
                         ids=["full", "h2o", "int8+kivi4"])
def test_predicted_peak_bounds_the_measured_one(sdpa_model, pick):
    plan = next(r for r in plan_generation(sdpa_model, 200, 8) if pick(r))
    import copy

    measured = measure_plan(copy.deepcopy(sdpa_model), None, plan, 200, 8)
    assert measured <= plan.peak <= 1.5 * measured, (plan.label(), measured, plan.peak)


def test_rows_cover_every_combination_and_compression_lowers_the_peak(sdpa_model):
    rows = plan_generation(sdpa_model, 2000, 100)
    assert len(rows) == 4 * len(KV_OPTIONS)
    full = next(r for r in rows if r.kv == "full" and r.weights.startswith("fp"))
    h2o = next(r for r in rows if r.kv == "h2o" and r.weights == "int8")
    assert h2o.peak < full.peak / 4 and rows[0] is full


def test_cli_recommends_and_refuses(model_dir):
    ok = CliRunner().invoke(app, ["plan-generate", str(model_dir), "--measure", "--prompt-tokens", "300", "--new-tokens", "8",
                                  "--budget", "2MiB"])
    assert ok.exit_code == 0, ok.output
    assert "recommended:" in ok.output
    assert "measured tensor peak" in ok.output
    tiny = CliRunner().invoke(app, ["plan-generate", str(model_dir), "--prompt-tokens", "300", "--new-tokens", "8",
                                    "--budget", "1KiB"])
    assert tiny.exit_code == 2 and "nothing fits" in tiny.output and "Traceback" not in tiny.output


def test_plan_generate_is_also_memfit_plan_generate(model_dir):
    """`memfit plan --generate` (issue 16): the same options and the same table as `memfit plan-generate`."""
    args = ["--prompt-tokens", "300", "--new-tokens", "8", "--budget", "2MiB"]
    old = CliRunner().invoke(app, ["plan-generate", str(model_dir), *args])
    for new in (["plan", "--generate", str(model_dir), *args],
                ["plan", "--generate", "--model", str(model_dir), *args]):
        result = CliRunner().invoke(app, new)
        assert result.exit_code == 0, result.output
        assert result.output == old.output and "recommended:" in result.output
    missing = CliRunner().invoke(app, ["plan", "--generate", str(model_dir), "--budget", "2MiB"])
    assert missing.exit_code == 2 and "--prompt-tokens" in missing.output


def test_tight_budget_picks_eviction_with_quantized_kept_tokens():
    """A budget that h2o+kivi4 meets and no plan ranked above it (plain h2o, KIVI alone, h2o+kivi8) does: the
    composition is recommended, and its measured peak is within the prediction. A 12-layer llama-tiny, so the
    cache (every layer) outweighs one layer's temporaries."""
    import copy

    from memfit.models import build_llama

    lm = build_llama("llama-tiny", 256, seed=0, num_hidden_layers=12, num_key_value_heads=4).eval()
    rows = plan_generation(lm, 1000, 8, kv_share=0.5)
    composed = min((r for r in rows if r.kv == "h2o" and r.kv_options == {"quant": "kivi4"}), key=lambda r: r.peak)
    best = next(r for r in rows if r.peak <= composed.peak)
    assert best is composed, best.label()
    assert all(r.peak > composed.peak for r in rows if r.kv == "h2o" and not r.kv_options)
    measured = measure_plan(copy.deepcopy(lm), None, composed, 1000, 8)
    assert measured <= composed.peak <= 1.5 * measured, (composed.label(), measured, composed.peak)
