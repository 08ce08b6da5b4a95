"""Tiny models and batches shared by the zeroth-order tests."""

from __future__ import annotations

import torch

from memfit.memory.spec import RunSpec
from memfit.models import build_llama
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

VOCAB = 128
SPSA_VARIANTS = ["mezo", "zo-sign", "zo-momentum", "zo-adam", "zo-block"]
ALL_VARIANTS = [*SPSA_VARIANTS, "forward-grad"]


def tiny_model(seed: int = 0):
    return build_llama("llama-tiny", VOCAB, seed=seed)


def lm_batch(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def technique_and_step(name: str, model, batch: dict, **options):
    """(technique, ctx, train_step) for step technique `name` on `model`."""
    t = build_technique("step", {"name": name, **options})
    spec = RunSpec.from_model(model, batch=batch["input_ids"].shape[0], seq=batch["input_ids"].shape[1],
                              task="causal_lm")
    ctx = Context(model=model, spec=spec, seed=0, techniques=[t])
    t.check(ctx)
    return t, ctx, t.make_train_step(ctx, None)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
