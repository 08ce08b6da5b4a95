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

    from memfit.memory.precision import dtype_of_name

    dtype = dtype_of_name(recipe.model_dtype)  # the dtype the run loads the weights in
    with torch.device("meta"):
        if recipe.model.preset is not None:
            vocab = getattr(recipe.data, "vocab_size", 32000)
            config = llama_config(recipe.model.preset, vocab, **recipe.model.overrides)
            return transformers.LlamaForCausalLM(config).to(dtype)
        if recipe.model.config is not None:
            config = config_file(recipe.model.config)
        elif Path(recipe.model.path).suffix == ".json":  # a config.json named as the model (`plan --model`)
            config = config_file(recipe.model.path)
        else:
            source, local = resolve_model_path(recipe.model.path)
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
        if recipe.task != "causal_lm":
            config.num_labels = getattr(recipe.data, "num_labels", None) or 2
        return getattr(transformers, TASK_AUTO_CLASS[recipe.task]).from_config(config, dtype=dtype)


def config_file(path: str):
    """The transformers config in `path` (a config.json, or a folder holding one); its vocabulary is the model's."""
    import transformers

    from memfit.errors import ModelError

    where = Path(path).expanduser()
    file = where / "config.json" if where.is_dir() else where
    if not file.is_file():
        raise ModelError(f"model.config {path}: no such config file (point it at a config.json or its folder)")
    try:
        return transformers.AutoConfig.from_pretrained(str(file))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model.config {path} is not a transformers config: {str(exc).splitlines()[0]}") from None


def spec_for(recipe: Recipe, model: nn.Module, precision: str | None = None, device: torch.device | None = None):
    """The run's `RunSpec` for `model`, at `precision` (default: the recipe's), on `device` (default: the
    recipe's, resolved on this machine; pass one to plan for a device this machine lacks)."""
    from memfit.train.build import resolve_device, run_spec

    if precision is not None and precision != recipe.train.precision:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": precision})})
    return run_spec(recipe, model, device if device is not None else resolve_device(recipe.train.device))


def estimate_recipe(source: str | Path | dict, overrides: list[str] = (), nproc: int | None = None,
                    ) -> tuple[MemoryBreakdown, int]:
    """(per-category peaks with `runtime` filled, predicted tensor peak of a step) for a recipe; the predicted
    process peak is `peak + breakdown.runtime`. With `nproc`: one rank of an FSDP2 run on that many processes
    (`memfit.memory.sharding.estimate_rank`)."""
    from memfit.memory.runtime import with_runtime

    recipe = load_recipe(source, list(overrides))
    spec = spec_for(recipe, meta_model(recipe))
    techniques = recipe.techniques()
    if nproc:
        from memfit.memory.sharding import estimate_rank

        rank = estimate_rank(spec, techniques, nproc, recipe.distributed.reshard_after_forward)
        breakdown, peak = rank.breakdown, rank.peak
    else:
        breakdown, peak = estimate_step(spec, techniques)
    libraries = tuple(sorted({lib for t in techniques for lib in getattr(t, "libraries", ())}))
    breakdown, _ = with_runtime(breakdown, peak, spec.extra.get("device", "cpu"), libraries)
    return breakdown, peak
