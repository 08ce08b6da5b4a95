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
        source, local = resolve_model_path(recipe.model.path)
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local)
        if recipe.task != "causal_lm":
            config.num_labels = getattr(recipe.data, "num_labels", None) or 2
        return getattr(transformers, TASK_AUTO_CLASS[recipe.task]).from_config(config)


def estimate_recipe(source: str | Path | dict, overrides: list[str] = (), nproc: int | None = None,
                    ) -> tuple[MemoryBreakdown, int]:
    """(per-category peaks, predicted tensor peak of a step) for a recipe; with `nproc`, of one rank of an FSDP2
    run on that many processes (`memfit.memory.sharding.estimate_rank`)."""
    from memfit.train.build import resolve_device, run_spec

    recipe = load_recipe(source, list(overrides))
    spec = run_spec(recipe, meta_model(recipe), resolve_device(recipe.train.device))
    if nproc:
        from memfit.memory.sharding import estimate_rank

        rank = estimate_rank(spec, recipe.techniques(), nproc, recipe.distributed.reshard_after_forward)
        return rank.breakdown, rank.peak
    return estimate_step(spec, recipe.techniques())
