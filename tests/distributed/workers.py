"""What each rank runs in the FSDP2 tests (module level: `spawn` starts workers by importing them). One spawned
group runs many checks in sequence, because starting the processes costs more than the checks."""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.distributed.tensor import Shard

from memfit.distributed import checkpoint
from memfit.distributed.runtime import init_distributed
from tests.distributed import harness as H

CHECKPOINT_OPTIMIZERS = ("adamw_8bit", "galore_8bit", "apollo", "galore_layerwise", "adamw_disk")
"""Local 8-bit codes and scales, owner-held projectors and 8-bit moments, seeds and norms, layer-wise extras,
state in files."""
SAME_GRADIENTS = {name: {**spec, "free_lr_ratio": 1.0} if spec["name"] == "frugal" else spec
                  for name, spec in H.OPTIMIZERS.items() if not spec.get("layerwise")}
"""Every optimizer at its defaults (FRUGAL's free_lr_ratio back to 1), stepped on identical gradients."""
SAVE_AT, RESUME_TO = 4, 8


def _guard(fn, *args):
    """Run one check; a failure comes back as text (so the other checks still run and the test shows it)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - reported by the test
        return "ERROR\n" + traceback.format_exc()[-3000:]


def _fresh(ctx, name: str):
    model = H.sharded_model(ctx)
    return model, H.build_optimizer(model, H.OPTIMIZERS[name], sharded=True)


def _save_and_resume(ctx, name: str, folder: Path) -> dict:
    """Train to SAVE_AT, save, train on; a fresh model + optimizer loaded from the save must repeat the losses."""
    model, opt = _fresh(ctx, name)
    H.train_steps(model, opt, range(SAVE_AT), True)
    path = checkpoint.save(folder / f"{name}-w{ctx.world_size}", model, opt, extra={"step": SAVE_AT})
    after = H.train_steps(model, opt, range(SAVE_AT, RESUME_TO), True)
    model, opt = _fresh(ctx, name)
    extra = checkpoint.load(path, model, opt)
    resumed = H.train_steps(model, opt, range(extra["step"], RESUME_TO), True)
    return {"after": after, "resumed": resumed}


def _resume_from(ctx, name: str, folder: Path, world: int) -> list[float]:
    """Load what `world` ranks saved and continue on this world size."""
    model, opt = _fresh(ctx, name)
    extra = checkpoint.load(folder / f"{name}-w{world}", model, opt)
    return H.train_steps(model, opt, range(extra["step"], RESUME_TO), True)


def one_rank_first(folder: str) -> dict:
    """World size 1: checkpoints for the 1 -> 2 test (and exact resume on one rank)."""
    ctx = init_distributed()
    return {name: _guard(_save_and_resume, ctx, name, Path(folder)) for name in CHECKPOINT_OPTIMIZERS}


def one_rank_after(folder: str) -> dict:
    ctx = init_distributed()
    return {name: _guard(_resume_from, ctx, name, Path(folder), 2) for name in CHECKPOINT_OPTIMIZERS}


def two_ranks(folder: str, steps: int, memory_layers: dict[bool, int], data: str | None = None) -> dict:
    """World size 2: parity of every optimizer, frozen dtypes, per-rank memory, checkpoints (2 -> 2, 1 -> 2), and
    (with the shared data) adapters and activation techniques through the run loop."""
    ctx = init_distributed()
    out: dict = {}
    if data is not None:  # first: after the harness's own runs in this process, a LoRA run's second loss moved by
        # ~1e-3 (not explained yet; a CLI run is one run per process, and these match one process there)
        out["techniques"] = {name: _guard(_technique_run, name, data) for name in H.TECHNIQUE_RUNS}
        out["qlora_dtypes"] = _guard(_qlora_dtypes, ctx, data)
        out["qlora_gather"] = _guard(_qlora_gather, ctx, data)
    out["parity"] = {name: _guard(H.sharded_losses, ctx, name, steps) for name in H.OPTIMIZERS}
    out["same_gradients"] = {name: _guard(_same_gradients, ctx, name) for name in SAME_GRADIENTS}
    out["frozen"] = _guard(_frozen_dtypes, ctx)
    out["memory"] = {str(reshard): _guard(_memory, ctx, layers, reshard) for reshard, layers in memory_layers.items()}
    out["checkpoint"] = {name: _guard(_save_and_resume, ctx, name, Path(folder)) for name in CHECKPOINT_OPTIMIZERS}
    out["from_one"] = {name: _guard(_resume_from, ctx, name, Path(folder), 1) for name in CHECKPOINT_OPTIMIZERS}
    out["refused"] = _guard(_refused, ctx)
    return out


def _technique_run(name: str, data: str) -> list[float]:
    from memfit.recipe import load_recipe
    from memfit.train import train

    return [r["loss"] for r in train(load_recipe(H.technique_recipe(name, data)), None, quiet=True).history]


def _qlora_dtypes(ctx, data: str) -> dict:
    """QLoRA's int8 base through the run path: each frozen shard keeps its storage dtype (never upcast)."""
    from memfit.distributed.shard import local_dtypes
    from memfit.recipe import load_recipe
    from memfit.train.build import build_run
    from memfit.train.parallel import Parallel

    built = build_run(load_recipe(H.technique_recipe("qlora_int8", data)), par=Parallel(ctx))
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    return {n: str(d) for n, d in local_dtypes(built.model).items() if n not in trainable}


def _qlora_gather(ctx, data: str) -> dict:
    """QLoRA's int8 base under bf16-mixed: one block's gathered (unsharded) parameter bytes, measured by
    unsharding it, next to `unit_bytes`' prediction on the estimator's shapes (FSDP2 casts only floating
    parameters to bf16: the int8 codes are gathered as stored)."""
    from memfit.memory.sharding import block_names, unit_bytes, units_from_params
    from memfit.recipe import load_recipe
    from memfit.train.build import build_run
    from memfit.train.parallel import Parallel

    recipe = H.technique_recipe("qlora_int8", data)
    recipe["train"]["precision"] = "bf16"
    built = build_run(load_recipe(recipe), par=Parallel(ctx))
    from torch.distributed.fsdp import FSDPModule

    block = next(m for m in built.model.modules() if isinstance(m, FSDPModule) and m is not built.model)
    block.unshard()
    measured = sum(p.numel() * p.element_size() for p in block.parameters())
    block.reshard()
    spec = built.spec
    for t in sorted(built.techniques, key=lambda t: t.order):
        spec = t.transform_spec(spec)
    _, blocks = units_from_params(spec.model.params, block_names(spec.model.params))
    return {"measured": measured, "predicted": unit_bytes(blocks[0], ctx.world_size, 2, 4).params}


def _same_gradients(ctx, name: str, steps: int = 5) -> float:
    """Max |difference| between the sharded and the single-process parameters after `steps` optimizer steps on the
    same (seeded) gradients: the sharded step itself, without the reduce-scatter's rounding."""
    import zlib

    from torch.distributed.tensor import distribute_tensor

    spec = SAME_GRADIENTS[name]
    sharded = H.sharded_model(ctx)
    reference = H.tiny()
    opt = H.build_optimizer(sharded, spec, sharded=True)
    ref_opt = H.build_optimizer(reference, spec, sharded=False)
    ref_params = dict(reference.named_parameters())
    for step in range(steps):
        for pname, p in sharded.named_parameters():
            g = torch.Generator().manual_seed(step * 7919 + zlib.crc32(pname.encode()))
            grad = torch.randn(p.shape, generator=g) * 1e-2
            ref_params[pname].grad = grad.clone()
            p.grad = distribute_tensor(grad, ctx.mesh, [Shard(0)])
        opt.step()
        ref_opt.step()
    with torch.no_grad():
        return max(float((p.full_tensor() - ref_params[n]).abs().max()) for n, p in sharded.named_parameters())


def _frozen_dtypes(ctx) -> dict:
    """LoRA on a bf16 base under bf16-mixed: frozen weights stay bf16 in their shards (accelerate #3844)."""
    from memfit.memory.sharding import unit_bytes
    from memfit.distributed.shard import local_dtypes, shard_model
    from memfit.memory.spec import RunSpec, model_shape
    from memfit.techniques.base import Context
    from memfit.techniques.registry import build_technique

    model = H.tiny().to(torch.bfloat16)
    ctx_ = Context(model=model, spec=RunSpec.from_model(model))
    build_technique("adapter", {"name": "lora", "r": 4}).apply(ctx_)
    model = ctx_.model
    before = {n: p.dtype for n, p in model.named_parameters()}
    frozen_shards = unit_bytes([p for p in model_shape(model).params if not p.trainable], ctx.world_size)
    shard_model(model, ctx.mesh, mp_policy="bf16-mixed")
    opt = H.build_optimizer(model, {"name": "adamw", "lr": 1e-2}, sharded=True)
    trained = {n: p.to_local().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.to_local().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = H.rank_rows(H.global_batch(0), ctx.rank, ctx.world_size)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    return {
        "before": {n: str(d) for n, d in before.items()},
        "after": {n: str(d) for n, d in local_dtypes(model).items()},
        "frozen_local_bytes": sum(p.to_local().untyped_storage().nbytes() for p in params.values()
                                  if not p.requires_grad),
        "frozen_shard_bytes": frozen_shards.sharded_params,
        "frozen_unchanged": all(torch.equal(params[n].to_local(), v) for n, v in frozen.items()),
        "trained_changed": all(not torch.equal(params[n].to_local(), v) for n, v in trained.items()
                               if "lora_B" in n),
    }


def _memory(ctx, layers: int, reshard: bool) -> dict:
    """Measured per-rank model state (AdamW) next to `sharded_bytes`' prediction."""
    from memfit.memory.sharding import sharded_bytes, units_from_params
    from memfit.distributed.measure import RankMeter
    from memfit.distributed.shard import find_blocks, shard_model
    from memfit.memory.spec import model_shape
    from memfit.memory.measure import state_bytes

    model = H.tiny_deep(layers)
    shape, blocks = model_shape(model), [name for name, _ in find_blocks(model)]
    shard_model(model, ctx.mesh, reshard_after_forward=reshard)
    opt = H.build_optimizer(model, H.OPTIMIZERS["adamw"], sharded=True)
    meter = RankMeter(model, opt, ctx.rank)
    for step in range(2):
        with meter.region():
            ids = H.rank_rows(H.global_batch(step), ctx.rank, ctx.world_size)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    report = meter.report()
    root, per_block = units_from_params(shape.params, blocks)
    predicted = sharded_bytes(root, per_block, ctx.world_size, state_bytes(opt.optimizer), reshard)
    return {"measured": report.to_dict(), "predicted": predicted}


def _refused(ctx) -> str:
    """An optimizer without an FSDP2 rule is refused with a ConfigError, not run wrongly."""
    from memfit.distributed.optim import ShardedOptimizer
    from memfit.errors import ConfigError

    model = H.sharded_model(ctx)
    try:
        ShardedOptimizer(torch.optim.Adagrad(model.parameters()), model)
    except ConfigError as exc:
        return str(exc)
    return "not refused"
