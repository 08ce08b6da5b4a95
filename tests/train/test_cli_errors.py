"""Bad input gets one clear `MemfitError` line from the CLI: exit code 2, no traceback."""

from __future__ import annotations

import yaml
import pytest
from typer.testing import CliRunner

from memfit.cli import app

from .recipes import toy_recipe


def _run(tmp_path, recipe: dict, *overrides: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path), *overrides, "-o", str(tmp_path / "run")])
    return result


def _assert_clean_error(result, *fragments: str):
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert text.count("error:") == 1, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_unknown_recipe_key_names_allowed_keys(tmp_path, data_dir):
    recipe = toy_recipe("pretrain", data_dir)
    recipe["train"]["stepz"] = 3
    _assert_clean_error(_run(tmp_path, recipe), "stepz", "allowed keys", "steps")


def test_unknown_technique(tmp_path, data_dir):
    _assert_clean_error(_run(tmp_path, toy_recipe("pretrain", data_dir), "optimizer.name=adamx"), "adamx", "adamw")


def test_missing_data_file(tmp_path, data_dir):
    recipe = toy_recipe("pretrain", data_dir)
    recipe["data"]["paths"] = [str(tmp_path / "nope.txt")]
    _assert_clean_error(_run(tmp_path, recipe), "nope.txt")


def test_wrong_column(tmp_path, data_dir):
    recipe = toy_recipe("finetune-cls", data_dir)
    recipe["data"]["text_column"] = "text"
    _assert_clean_error(_run(tmp_path, recipe), "text", "sentence")


def test_empty_dataset(tmp_path, data_dir):
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    recipe = toy_recipe("finetune-cls", data_dir)
    recipe["data"]["train"] = str(empty)
    _assert_clean_error(_run(tmp_path, recipe), "empty")


def test_label_out_of_range(tmp_path, data_dir):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nbad film\t7\n")
    recipe = toy_recipe("finetune-cls", data_dir)
    recipe["data"].update({"train": str(bad), "num_labels": 2})
    _assert_clean_error(_run(tmp_path, recipe), "7")


def test_model_path_does_not_exist(tmp_path, data_dir):
    recipe = toy_recipe("finetune-cls", data_dir)
    recipe["model"] = {"path": str(tmp_path / "no-model")}
    _assert_clean_error(_run(tmp_path, recipe), "no-model", "does not exist")


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "missing.yaml")])
    _assert_clean_error(result, "missing.yaml")


def test_resume_without_checkpoint(tmp_path, data_dir):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(toy_recipe("pretrain", data_dir)))
    result = CliRunner().invoke(app, ["train", str(path), "--resume", "-o", str(tmp_path / "fresh")])
    _assert_clean_error(result, "no checkpoint")


@pytest.mark.parametrize("override,fragment", [("train.steps=0", "steps"), ("train.schedule=linear", "schedule"),
                                               ("model.preset=llama-huge", "llama-huge")])
def test_bad_values(tmp_path, data_dir, override, fragment):
    _assert_clean_error(_run(tmp_path, toy_recipe("pretrain", data_dir), override), fragment)
