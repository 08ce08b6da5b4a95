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

    from memfit.models.load import TASK_AUTO_CLASS, check_config, check_weights, load_config, resolve_model_path
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
            config = (load_config(source) if local
                      else transformers.AutoConfig.from_pretrained(source, local_files_only=local))
        check_config(config, recipe.model.config or recipe.model.path)
        if recipe.task != "causal_lm":
            config.num_labels = getattr(recipe.data, "num_labels", None) or 2
        model = getattr(transformers, TASK_AUTO_CLASS[recipe.task]).from_config(config, dtype=dtype)
    if (recipe.model.path is not None and Path(recipe.model.path).is_dir()
            and getattr(model.config, "quantization_config", None) is None):  # packed weights have other shapes
        check_weights(model, recipe.model.path)
    return model


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


def spec_for(recipe: Recipe, model, precision: str | None = None, device: torch.device | None = None):
    """The run's `RunSpec` for `model` (a module, or its `ModelFacts`), at `precision` (default: the recipe's), on
    `device` (default: the recipe's, resolved on this machine; pass one to plan for a device this machine lacks)."""
    from memfit.train.build import resolve_device, run_spec

    if precision is not None and precision != recipe.train.precision:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": precision})})
    return run_spec(recipe, model, device if device is not None else resolve_device(recipe.train.device))


# Building the meta model needs transformers' modeling code, whose import (torch.distributed.tensor, torch._dynamo,
# scipy, torchao via the quantizers) was most of `memfit plan`'s wall time. What an estimate reads off the model is
# pure data (`ModelFacts`: every parameter's shape and the block family's facts, some probed by running the model's
# own norm and activation modules), so it is cached per model description (`memfit.memory.cache.memo`): the preset,
# or the bytes of the local config.json, with the task, label count and dtype. Hub ids are not cached.

FACTS_SOURCES = ("memory/arch", "memory/spec.py", "memory/precision.py", "memory/measure.py", "plan/meta.py",
                 "train/build.py", "models/presets.py", "models/load.py")
"""memfit's code that decides a model's facts: the cache key includes its source."""


def _model_description(recipe: Recipe) -> dict | None:
    """What decides the recipe's model: its preset, or its local config.json's text; None for a hub id."""
    from memfit.models.load import resolve_model_path

    m = recipe.model
    if m.preset is not None:
        return {"preset": m.preset, "vocab": getattr(recipe.data, "vocab_size", 32000), "overrides": m.overrides}
    if m.config is not None or Path(m.path).suffix == ".json":
        where = Path(m.config if m.config is not None else m.path).expanduser()
    else:
        source, local = resolve_model_path(m.path)
        if not local:
            return None
        where = Path(source)
    file = where / "config.json" if where.is_dir() else where
    try:
        return {"config": file.read_text()}
    except OSError:
        return None  # meta_model says what is wrong


def meta_facts(recipe: Recipe):
    """The recipe's `ModelFacts` (`memfit.train.build`): read off its meta model once, then from the cache in
    `$MEMFIT_CACHE/facts/` (exactly what the meta model gives: the same code wrote it)."""
    from memfit.memory.cache import memo
    from memfit.train.build import model_facts

    described = _model_description(recipe)
    if described is None:
        return model_facts(meta_model(recipe))
    labels = getattr(recipe.data, "num_labels", None) if recipe.task != "causal_lm" else None
    return memo("facts", (sorted(described.items()), recipe.task, labels, recipe.model_dtype),
                lambda: model_facts(meta_model(recipe)), FACTS_SOURCES)


def estimate_recipe(source: str | Path | dict, overrides: list[str] = (), nproc: int | None = None,
                    ) -> tuple[MemoryBreakdown, int]:
    """(per-category peaks with `runtime` filled, predicted tensor peak of a step) for a recipe; the predicted
    process peak is `peak + breakdown.runtime`. With `nproc`: one rank of an FSDP2 run on that many processes
    (`memfit.memory.sharding.estimate_rank`)."""
    from memfit.memory.runtime import with_runtime

    recipe = load_recipe(source, list(overrides))
    spec = spec_for(recipe, meta_facts(recipe))
    techniques = recipe.techniques()
    if nproc:
        from memfit.memory.sharding import estimate_rank

        rank = estimate_rank(spec, techniques, nproc, recipe.distributed.reshard_after_forward)
        breakdown, peak = rank.breakdown, rank.peak
    else:
        breakdown, peak = estimate_step(spec, techniques)
    breakdown, _ = with_runtime(breakdown, peak, spec, techniques)
    return breakdown, peak
