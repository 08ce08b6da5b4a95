"""Toy-size versions of the shipped recipes, shared by the spine tests."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def toy_recipe(name: str, data: Path, **train) -> dict:
    """The shipped recipe `recipes/<name>.yaml` shrunk to run in seconds."""
    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    recipe["train"].update({"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 2,
                            "log_every": 1, "measure_steps": 1, **train})
    d = recipe["data"]
    if d["kind"] == "text":
        recipe["model"] = {"preset": "llama-tiny"}
        d.update({"paths": [str(data / "tinyshakespeare" / "input.txt")], "block_size": 32, "vocab_size": 300,
                  "max_chars": 20000})
    else:
        d.update({"train": str(data / Path(d["train"]).relative_to("../shared/data")),
                  "eval": str(data / Path(d["eval"]).relative_to("../shared/data")),
                  "max_train_examples": 64, "max_eval_examples": 16, "max_length": 32})
    return recipe
