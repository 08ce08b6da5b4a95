"""A recipe for a model the user names (`memfit plan --model DIR|config.json --task finetune-causal`): the
planner needs only the model's shapes, the task, and the batch and sequence it will run at — the data section is
a placeholder the user fills before training (`--write` says so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memfit.errors import ConfigError

TASKS: dict[str, tuple[str, bool]] = {
    # name: (recipe task, starts from pretrained weights)
    "finetune-causal": ("causal_lm", True),
    "pretrain-causal": ("causal_lm", False),
    "finetune-cls": ("seq_cls", True),
    "finetune-ner": ("token_cls", True),
}

DATA_PLACEHOLDER = "REPLACE-WITH-YOUR-DATA"


def recipe_for(model: str, task: str, seq: int = 2048, batch: int = 1, device: str = "auto",
               num_labels: int = 2) -> tuple[dict[str, Any], bool]:
    """(recipe dict, pretrained) for planning `model` (a folder with config.json, a config.json, a named model or
    a hub id) on `task`."""
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got '{task}'")
    recipe_task, pretrained = TASKS[task]
    path = Path(model).expanduser()
    if path.is_file() and path.suffix != ".json":
        raise ConfigError(f"--model {model} is a file but not a config.json; pass the model folder or its config")
    if recipe_task == "causal_lm":
        data: dict[str, Any] = {"kind": "text", "paths": [DATA_PLACEHOLDER], "block_size": seq}
    elif recipe_task == "seq_cls":
        data = {"kind": "classification", "train": DATA_PLACEHOLDER, "max_length": seq, "num_labels": num_labels}
    else:
        data = {"kind": "conll", "train": DATA_PLACEHOLDER, "max_length": seq}
    recipe = {"name": f"plan-{path.stem if path.is_file() else path.name}", "task": recipe_task,
              "model": {"path": str(path) if path.exists() else model}, "data": data,
              "train": {"batch_size": batch, "device": device}, "optimizer": {"name": "adamw", "lr": 1e-4 if
                                                                               pretrained else 1e-3}}
    return recipe, pretrained
