"""The recipe's model on the `meta` device, and a recipe's estimate without running it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.estimate import estimate_step
from memfit.recipe import Recipe, load_recipe


def meta_model(recipe: Recipe) -> nn.Module:
    """The recipe's model with shapes but no storage (works for models larger than memory)."""
    import transformers

    from memfit.models.load import TASK_AUTO_CLASS, resolve_model_path
    from memfit.models.presets import llama_config

    with torch.device("meta"):
        if recipe.model.preset is not None:
            vocab = getattr(recipe.data, "vocab_size", 32000)
            return transformers.LlamaForCausalLM(llama_config(recipe.model.preset, vocab, **recipe.model.overrides))
        config = _config_file(recipe.model.path)
        if config is None:
            source, local = resolve_model_path(recipe.model.path)
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
        if recipe.task != "causal_lm":
            config.num_labels = getattr(recipe.data, "num_labels", None) or 2
        return getattr(transformers, TASK_AUTO_CLASS[recipe.task]).from_config(config)


def _config_file(path: str):
    """The transformers config stored in a `config.json` file `path` (None when `path` is not one)."""
    import json

    import transformers

    from memfit.errors import ModelError

    file = Path(path).expanduser()
    if not (file.is_file() and file.suffix == ".json"):
        return None
    fields = json.loads(file.read_text())
    if "model_type" not in fields:
        raise ModelError(f"{file} has no model_type; is it a transformers config.json?")
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def spec_for(recipe: Recipe, model: nn.Module, precision: str | None = None, device: torch.device | None = None):
    """The run's `RunSpec` for `model`, at `precision` (default: the recipe's), on `device` (default: the
    recipe's, resolved on this machine; pass one to plan for a device this machine lacks)."""
    from memfit.train.build import resolve_device, run_spec

    if precision is not None and precision != recipe.train.precision:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": precision})})
    return run_spec(recipe, model, device if device is not None else resolve_device(recipe.train.device))


def estimate_recipe(source: str | Path | dict, overrides: list[str] = ()) -> tuple[MemoryBreakdown, int]:
    """(per-category peaks with `runtime` filled, predicted tensor peak of a step) for a recipe; the predicted
    process peak is `peak + breakdown.runtime`."""
    from memfit.memory.runtime import with_runtime

    recipe = load_recipe(source, list(overrides))
    spec = spec_for(recipe, meta_model(recipe))
    techniques = recipe.techniques()
    breakdown, peak = estimate_step(spec, techniques)
    breakdown, _ = with_runtime(breakdown, peak, spec, techniques)
    return breakdown, peak
