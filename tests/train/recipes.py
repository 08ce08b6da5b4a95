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


def resumed_losses_match(recipe, tmp_path) -> bool:
    """Train `recipe` (6 steps, a checkpoint at 3) in full and again resumed from step 3: the losses of steps 4-6
    are bit-identical."""
    import json
    import shutil

    from memfit.train import train

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    full, part = tmp_path / "full", tmp_path / "part"
    train(recipe, full, quiet=True)
    shutil.copytree(full, part)  # a run stopped right after its step-3 checkpoint
    shutil.rmtree(part / "checkpoints" / "step-0000006")
    (part / "checkpoints" / "latest").write_text("step-0000003")
    train(recipe, part, resume=True, quiet=True)
    a, b = losses(full), losses(part)
    return [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
