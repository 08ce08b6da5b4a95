"""The CLI end to end: train a toy recipe, report it, estimate it; quickstart runs from the package alone."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from memfit.cli import app

from .recipes import toy_recipe


@pytest.mark.parametrize("name,metric", [("pretrain", "perplexity"), ("finetune-cls", "accuracy"),
                                         ("finetune-ner", "entity_f1")])
def test_train_report_estimate(tmp_path, data_dir, name, metric):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(toy_recipe(name, data_dir)))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), "train.steps=2", "-o", str(run)])
    assert result.exit_code == 0, result.output
    assert "memory by category" in result.output and "estimate" in result.output
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["final"] and metric in lines[-1]

    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "gradients" in result.output and (run / "report.html").exists()

    result = CliRunner().invoke(app, ["estimate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "activations" in result.output and "predicted step peak" in result.output


def test_train_refuses_to_overwrite_a_run(tmp_path, data_dir):
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(yaml.safe_dump(toy_recipe("pretrain", data_dir, steps=1)))
    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", str(recipe), "-o", str(run)]).exit_code == 0
    again = CliRunner().invoke(app, ["train", str(recipe), "-o", str(run)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_quickstart(tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--steps", "3", "-o", str(tmp_path / "qs")])
    assert result.exit_code == 0, result.output
    assert "memory by category" in result.output and "ROMEO" in result.output
    assert (tmp_path / "qs" / "model" / "config.json").exists()
