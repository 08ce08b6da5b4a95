"""`model: {config: ...}` (a config.json alone, built on the meta device) and `memfit estimate --json`."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from memfit.cli import app

from .recipes import toy_recipe


def _recipe(tmp_path, data_dir, config, **train):
    recipe = toy_recipe("pretrain", data_dir, **train)
    recipe["model"] = {"config": str(config)}
    path = tmp_path / f"recipe-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_estimate_json_from_a_config_file(tmp_path, data_dir):
    import transformers

    config = transformers.AutoConfig.for_model("qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path / "qwen")
    out = {}
    for precision in ("32-true", "bf16-true"):
        result = CliRunner().invoke(app, ["estimate", str(_recipe(tmp_path, data_dir, tmp_path / "qwen" / "config.json",
                                                                  precision=precision)), "--json"])
        assert result.exit_code == 0, result.output
        out[precision] = json.loads(result.output)
    fp32, bf16 = out["32-true"], out["bf16-true"]
    assert fp32["model_dtype"] == "fp32" and bf16["model_dtype"] == "bf16"
    assert set(fp32["categories"]) >= {"parameters", "gradients", "optimizer", "activations", "temporaries"}
    assert fp32["step_peak"] <= fp32["sum_of_category_peaks"]
    # the vocabulary is the config's (1000), not the recipe's tokenizer's: embedding + untied head
    n = json.loads((tmp_path / "qwen" / "config.json").read_text())
    assert fp32["categories"]["parameters"] >= 2 * n["vocab_size"] * n["hidden_size"] * 4
    assert bf16["categories"]["parameters"] * 2 == fp32["categories"]["parameters"]


def test_config_only_model_cannot_train(tmp_path, data_dir):
    import transformers

    from memfit.errors import ConfigError
    from memfit.recipe import load_recipe
    from memfit.train.build import build_run

    transformers.AutoConfig.for_model("llama", vocab_size=300, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path / "cfg")
    with pytest.raises(ConfigError, match="estimate"):
        build_run(load_recipe(_recipe(tmp_path, data_dir, tmp_path / "cfg")))
    missing = CliRunner().invoke(app, ["estimate", str(_recipe(tmp_path, data_dir, tmp_path / "nope.json"))])
    assert missing.exit_code == 2 and "no such config" in missing.output
