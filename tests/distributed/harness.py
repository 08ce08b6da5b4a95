"""A minimal, self-contained training loop for the FSDP2 tests: a tiny Llama from config, a fixed global batch per
step split across ranks, and each memfit optimizer built by its technique — on one plain process (the reference)
or sharded across the ranks of a `memfit.distributed.runtime.spawn` group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from memfit.models import build_llama
from memfit.optim.layerwise import make_layerwise
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

VOCAB = 255  # odd sizes (vocabulary, MLP width) leave the last rank a shorter shard, as real models do
INTERMEDIATE = 175
GLOBAL_BATCH = 4
SEQ = 16

OPTIMIZERS: dict[str, dict] = {
    "adamw": {"name": "adamw", "lr": 1e-3},
    # block 64 (the tiny model's row length): down_proj rows (175) straddle blocks -> owner path, others local
    "adamw_8bit": {"name": "adamw_8bit", "lr": 1e-3, "block_size": 64, "min_8bit_size": 1024},
    "adam_mini": {"name": "adam_mini", "lr": 1e-3},
    "galore": {"name": "galore", "lr": 1e-3, "rank": 8, "update_proj_gap": 4},
    "galore_8bit": {"name": "galore_8bit", "lr": 1e-3, "rank": 8, "update_proj_gap": 4, "block_size": 64,
                    "min_8bit_size": 1024},
    "natural_galore": {"name": "natural_galore", "lr": 1e-3, "rank": 8, "update_proj_gap": 4, "history": 3},
    "apollo": {"name": "apollo", "lr": 1e-3, "rank": 8, "update_proj_gap": 4},
    "apollo_mini": {"name": "apollo_mini", "lr": 1e-3, "update_proj_gap": 4},
    # signSGD on the residual turns the last-bit differences of the averaged gradient into whole-lr steps where an
    # entry is near zero, so losses drift apart faster than 1e-5 at the default ratio 1 (see README);
    # test_same_gradients_same_step checks the default bit-exactly on identical gradients
    "frugal": {"name": "frugal", "lr": 1e-3, "rank": 8, "update_proj_gap": 4, "free_lr_ratio": 0.05},
    "frugal_random": {"name": "frugal", "lr": 1e-3, "rank": 8, "update_proj_gap": 4, "subspace": "random",
                      "free_lr_ratio": 0.05},
    "scale": {"name": "scale", "lr": 1e-3},
    "adamw_layerwise": {"name": "adamw", "lr": 1e-3, "layerwise": True},
    "galore_layerwise": {"name": "galore", "lr": 1e-3, "rank": 8, "update_proj_gap": 4, "layerwise": True},
    # state on disk (memfit.optim.offload), each rank its own files: local shards and owner-held matrices
    "adamw_disk": {"name": "adamw", "lr": 1e-3, "offload": "disk"},
    "galore_disk": {"name": "galore", "lr": 1e-3, "rank": 8, "update_proj_gap": 4, "offload": "disk"},
}


def tiny(seed: int = 0) -> torch.nn.Module:
    return build_llama("llama-tiny", VOCAB, seed=seed, intermediate_size=INTERMEDIATE)


def tiny_deep(layers: int) -> torch.nn.Module:
    """The tiny Llama with more blocks (so the blocks in flight are a small part of the model, as in real LLMs)."""
    return build_llama("llama-tiny", VOCAB, seed=0, num_hidden_layers=layers, intermediate_size=INTERMEDIATE)


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)


def rank_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]


def build_optimizer(model: torch.nn.Module, spec: dict, sharded: bool):
    """The optimizer a run builds for `spec` (sharded: wrapped for FSDP2; disk offload or layer-wise outermost)."""
    from memfit.distributed.optim import ShardedOptimizer
    from memfit.optim.offload import DiskStateOptimizer

    technique = build_technique("optimizer", spec)
    opt = technique.build_optimizer(Context(model=model, spec=None))
    if sharded:
        opt = ShardedOptimizer(opt, model)
    if spec.get("offload") == "disk":
        opt = DiskStateOptimizer(opt, model)
    if spec.get("layerwise"):
        opt = make_layerwise(opt, model)
    return opt


def train_steps(model, opt, steps: range, sharded: bool) -> list[float]:
    """One optimizer step per global batch; the loss is the global batch's mean (all ranks agree)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    device = next(model.parameters()).device
    losses = []
    for step in steps:
        ids = rank_rows(global_batch(step), rank, world).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if sharded:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


def reference_losses(name: str, steps: int) -> list[float]:
    """One process, state in memory (the reference for the sharded and the disk-offloaded runs)."""
    torch.manual_seed(0)
    model = tiny()
    spec = {k: v for k, v in OPTIMIZERS[name].items() if k != "offload"}
    return train_steps(model, build_optimizer(model, spec, sharded=False), range(steps), False)


def sharded_model(ctx, reshard_after_forward: bool = True, precision: str = "32-true"):
    from memfit.distributed.shard import shard_model

    torch.manual_seed(0)
    model = tiny().to(ctx.device)
    shard_model(model, ctx.mesh, reshard_after_forward=reshard_after_forward, mp_policy=precision)
    return model


def sharded_losses(ctx, name: str, steps: int) -> list[float]:
    model = sharded_model(ctx)
    return train_steps(model, build_optimizer(model, OPTIMIZERS[name], sharded=True), range(steps), True)


TECHNIQUE_RUNS: dict[str, dict] = {
    "lora": {"adapter": {"name": "lora", "r": 4}},
    "dora": {"adapter": {"name": "dora", "r": 4}},
    "qlora_int8": {"adapter": {"name": "qlora", "r": 4, "format": "int8"}},
    "lora_bf16_checkpointing_chunked_ce": {"adapter": {"name": "lora", "r": 4},
                                           "activations": [{"name": "checkpointing"}, {"name": "chunked_ce"}],
                                           "train": {"precision": "bf16"}},
    "checkpointing_galore": {"activations": [{"name": "checkpointing"}],
                             "optimizer": {"name": "galore", "lr": 1e-3, "rank": 8, "update_proj_gap": 2}},
    # state on disk through the run path (per-rank memory meter on the wrapper, files per rank)
    "adamw_offload_disk": {"optimizer": {"name": "adamw", "lr": 1e-3, "offload": "disk"}},
}
"""Adapters, activation techniques and disk offload through the whole run path (`memfit.train.train`) under FSDP2."""


def technique_recipe(name: str, data: str) -> dict:
    """The toy pretraining recipe (3 steps, one measured) with the techniques of `TECHNIQUE_RUNS[name]`."""
    from pathlib import Path

    from tests.train.recipes import toy_recipe

    extra = dict(TECHNIQUE_RUNS[name])
    recipe = toy_recipe("pretrain", Path(data), steps=3, eval_every=0, **extra.pop("train", {}))
    return {**recipe, **extra}
