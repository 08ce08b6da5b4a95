"""The weights and adapter techniques through the real run loop (recipe -> train -> measured vs estimate)."""

import json

import pytest

from memfit.recipe import load_recipe
from memfit.train import train


def _recipe(data_dir) -> dict:
    return {
        "name": "weights-toy", "seed": 0, "task": "causal_lm", "model": {"preset": "llama-tiny"},
        "data": {"kind": "text", "paths": [str(data_dir / "tinyshakespeare" / "input.txt")], "block_size": 32,
                 "vocab_size": 300, "max_chars": 20000},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 2,
                  "log_every": 1, "measure_steps": 1},
        "optimizer": {"name": "adamw", "lr": 1.0e-3},
    }


@pytest.mark.parametrize("extra", [
    {"adapter": {"name": "qlora", "r": 4}},
    {"adapter": {"name": "peqa", "bits": 4}},
    {"weights": {"name": "nf4"}},
])
def test_recipe_runs_and_parameter_bytes_match_estimate(extra, data_dir, tmp_path):
    recipe = _recipe(data_dir)
    recipe.update(extra)
    result = train(load_recipe(recipe), tmp_path / "run", quiet=True)
    assert result.memory is not None
    summary = json.loads((tmp_path / "run" / "memory.json").read_text())
    assert summary["estimate"]["parameters"] == result.memory.peak.parameters
    assert result.metrics["perplexity"] > 1
