"""The standard workloads of DESIGN §5, read from the shipped recipes so benchmarks and users run the same thing.

`workload(name, opts, **train)` returns a recipe dict with data paths rebased onto `opts.data_dir` and the
`train` section updated; suites then set the technique slots they compare. Suites that need a trained causal LM
(inference, weights) train a shrunk pretrain workload once (`small_lm_recipe`, `pretrained_lm`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from memfit.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
WORKLOADS = {"pretrain": "pretrain", "finetune-cls": "finetune-cls", "finetune-ner": "finetune-ner"}
SHARED_PREFIX = "../shared/data"

# the speed suites' model (training and decode rows share it)
SPEED_PRESET = "llama-20m"
SPEED_MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4}  # 7.4 M parameters with the 8192-token vocabulary
SPEED_QUICK_MODEL = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 4}


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


def small_lm_recipe(name: str, data_dir: Path, *, block_size: int, vocab_size: int, steps: int, batch_size: int,
                    warmup_steps: int, eval_every: int, eval_batches: int) -> dict[str, Any]:
    """The pretrain workload shrunk to a llama-1m (War and Peace + Shakespeare, 5 % held out, cosine AdamW)."""
    return {
        "name": name, "seed": 0, "task": "causal_lm", "model": {"preset": "llama-1m"},
        "data": {"kind": "text", "block_size": block_size, "vocab_size": vocab_size, "val_fraction": 0.05,
                 "paths": [str(data_dir / "warpeace/input.txt"), str(data_dir / "tinyshakespeare/input.txt")]},
        "train": {"steps": steps, "batch_size": batch_size, "schedule": "cosine", "warmup_steps": warmup_steps,
                  "precision": "fp32", "eval_every": eval_every, "eval_batches": eval_batches},
        "optimizer": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 0.01},
    }


def pretrained_lm(recipe: dict[str, Any], cache: Path) -> Path:
    """The model folder of a causal LM to benchmark: `MEMFIT_INFERENCE_MODEL` if set, else `recipe` trained once
    and cached in `cache` (an interrupted training resumes from its newest checkpoint)."""
    if os.environ.get("MEMFIT_INFERENCE_MODEL"):
        return Path(os.environ["MEMFIT_INFERENCE_MODEL"])
    if not (cache / "model" / "config.json").exists():
        from memfit.recipe import load_recipe
        from memfit.train import train
        from memfit.train.checkpoint import has_checkpoint

        train(load_recipe(recipe), cache, resume=cache.is_dir() and has_checkpoint(cache))
    return cache / "model"


QUALITY_LM_CACHE = Path("~/.cache/memfit/models/quality-lm").expanduser()


def quality_lm_recipe(data_dir: Path) -> dict[str, Any]:
    """The bench model that quality columns are measured on (issue 16 item 8): a 5.0M-parameter Llama (6 layers x
    256, 4 heads, byte-level BPE of 512) pretrained for about 35 minutes on one CPU thread (bf16 autocast, 300 steps
    of 8 x 512 tokens) on War and Peace + Shakespeare + WikiText-2 valid (the last 5 % of each held out; the
    WikiText-2 test split is never read). Positions up to 511 are trained (longer blocks did not fit the CPU time)."""
    return {
        "name": "quality-lm", "seed": 0, "task": "causal_lm",
        "model": {"preset": "llama-1m", "overrides": {"hidden_size": 256, "intermediate_size": 704,
                                                      "num_hidden_layers": 6, "num_attention_heads": 4,
                                                      "num_key_value_heads": 4}},
        "data": {"kind": "text", "block_size": 512, "vocab_size": 512, "val_fraction": 0.05,
                 "paths": [str(data_dir / "warpeace/input.txt"), str(data_dir / "tinyshakespeare/input.txt"),
                           str(data_dir / "wikitext2/valid.txt")]},
        "train": {"steps": 300, "batch_size": 8, "schedule": "cosine", "warmup_steps": 20, "precision": "bf16-mixed",
                  "eval_every": 100, "eval_batches": 4, "save_every": 25},
        "optimizer": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 0.01},
    }


def quality_lm(data_dir: Path) -> Path:
    """The quality bench model's folder (`MEMFIT_INFERENCE_MODEL` if set): trained once by
    `python -m memfit.bench.workloads quality-lm` (or on first use) and cached in `QUALITY_LM_CACHE`; never
    downloaded."""
    return pretrained_lm(quality_lm_recipe(data_dir), QUALITY_LM_CACHE)


if __name__ == "__main__":  # python -m memfit.bench.workloads quality-lm [DATA_DIR]
    import sys

    if sys.argv[1:2] != ["quality-lm"]:
        raise SystemExit("usage: python -m memfit.bench.workloads quality-lm [DATA_DIR]")
    from memfit.bench.harness import SHARED_DATA

    print(quality_lm(Path(sys.argv[2]) if len(sys.argv) > 2 else SHARED_DATA))
