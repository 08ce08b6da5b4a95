"""The standard workloads of DESIGN §5, read from the shipped recipes so benchmarks and users run the same thing.

`workload(name, opts, **train)` returns a recipe dict with data paths rebased onto `opts.data_dir` and the
`train` section updated; suites then set the technique slots they compare.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from memfit.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
WORKLOADS = {"pretrain": "pretrain", "finetune-cls": "finetune-cls", "finetune-ner": "finetune-ner"}
SHARED_PREFIX = "../shared/data"


def _rebase(path: str, data_dir: Path) -> str:
    return str(data_dir / Path(path).relative_to(SHARED_PREFIX)) if path.startswith(SHARED_PREFIX) else path


def workload(name: str, data_dir: Path, **train: Any) -> dict[str, Any]:
    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload '{name}'; choose one of: {', '.join(WORKLOADS)}")
    path = RECIPES / f"{WORKLOADS[name]}.yaml"
    if not path.exists():
        raise ConfigError(f"workload recipe {path} not found; run benchmarks from a source checkout of memfit")
    recipe = copy.deepcopy(yaml.safe_load(path.read_text()))
    data = recipe["data"]
    if "paths" in data:
        data["paths"] = [_rebase(p, data_dir) for p in data["paths"]]
    for key in ("train", "eval"):
        if data.get(key):
            data[key] = _rebase(data[key], data_dir)
    recipe["train"].update(train)
    return recipe
