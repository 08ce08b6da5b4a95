"""The planner: predicted peaks per candidate, the choice respects the budget and fidelity order, and the
chosen plan's measured peak stays within its prediction (and the budget)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from memfit.cli import app
from memfit.errors import BudgetError, ConfigError
from memfit.plan import choose, parse_bytes, plan, verify

from train.recipes import toy_recipe


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5G") == int(1.5 * 2**30)
    assert parse_bytes("1000") == 1000
    with pytest.raises(ConfigError, match="2GiB"):
        parse_bytes("lots")


def _toy(data_dir):
    recipe = toy_recipe("pretrain", data_dir)
    recipe["model"] = {"preset": "llama-tiny"}
    recipe["data"].update({"block_size": 128, "vocab_size": 512})
    recipe["train"]["batch_size"] = 8
    return recipe


def test_plan_orders_by_fidelity_then_memory(data_dir):
    recipe = _toy(data_dir)
    rows = plan(recipe, budget=2**40)  # everything fits: the baseline (exact, no recompute) wins
    assert choose(rows, 2**40).candidate.label == "AdamW (baseline)"
    baseline = next(r for r in rows if r.candidate.label == "AdamW (baseline)")
    tight = baseline.peak - 1
    rows = plan(recipe, budget=tight)
    chosen = choose(rows, tight)
    assert chosen.peak <= tight and chosen.candidate.label != "AdamW (baseline)"
    fitting = [r for r in rows if r.fits]
    assert all(r.candidate.fidelity >= chosen.candidate.fidelity for r in fitting)
    with pytest.raises(BudgetError, match="smallest plan"):
        choose(plan(recipe, budget=1000), 1000)


def test_adapter_plans_scale_the_users_learning_rate(data_dir):
    recipe = _toy(data_dir)
    user_lr = recipe["optimizer"]["lr"]
    rows = {r.candidate.label: r for r in plan(recipe, budget=2**40)}
    assert rows["LoRA r=16"].recipe["optimizer"]["lr"] == pytest.approx(10 * user_lr)
    assert rows["GaLore r=16"].recipe["optimizer"]["lr"] == user_lr
    assert "scale" not in rows["GaLore r=16"].recipe["optimizer"]  # pre-training from a preset: GaLore's default


def test_fine_tune_plans_use_galores_fine_tuning_scale():
    from memfit.memory.spec import ModelShape, ParamInfo
    from memfit.plan.planner import GALORE_FINE_TUNE_SCALE, candidates

    shape = ModelShape(params=(ParamInfo("w", (64, 64), 4.0, True),), hidden=64, n_layers=1, n_heads=1,
                       n_kv_heads=1, head_dim=64, intermediate=128, vocab=100, family="bert")
    galore = [c for c in candidates("seq_cls", shape, fine_tune=True) if c.label.startswith("GaLore")]
    assert galore and all(c.slots["optimizer"]["scale"] == GALORE_FINE_TUNE_SCALE for c in galore)


def test_chosen_plan_measures_within_prediction(data_dir):
    recipe = _toy(data_dir)
    rows = plan(recipe, budget=2**40)
    baseline = next(r for r in rows if r.candidate.label == "AdamW (baseline)")
    chosen = choose(plan(recipe, budget=baseline.peak - 1), baseline.peak - 1)
    result = verify(chosen, steps=2)
    assert result.memory.tensor_peak <= chosen.peak * 1.10
    assert result.memory.tensor_peak <= baseline.peak


def test_plan_cli(tmp_path, data_dir):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_toy(data_dir)))
    out = tmp_path / "chosen.yaml"
    result = CliRunner().invoke(app, ["plan", str(path), "--budget", "1GiB", "--write", str(out)])
    assert result.exit_code == 0, result.output
    assert "chosen:" in result.output and out.exists()
    result = CliRunner().invoke(app, ["plan", str(path), "--budget", "10KiB"])
    assert result.exit_code == 2 and "no plan fits" in result.output
