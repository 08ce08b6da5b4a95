"""`memfit train` on several processes: the run loop's distributed parts (FSDP2 via `memfit.distributed`).

A run is distributed when it runs under torchrun's environment (`memfit train R --nproc N` re-executes itself
through torchrun; `torchrun --nproc_per_node N -m memfit train R` does the same by hand, also across nodes).
Then, on every rank:

- the model is built, techniques applied, and every block plus the root `fully_shard`-ed (`shard_model`), before
  the optimizer is built on the sharded parameters and wrapped in `ShardedOptimizer` (layer-wise outermost);
- `train.batch_size` is the *global* batch: each micro-batch's rows are split evenly, rank r taking rows
  [r·B/N, (r+1)·B/N); FSDP2 averages gradients across ranks, so with equal tokens per rank (packed text,
  one label per example) a step equals the single-process step on the whole batch (up to summation order).
  Gradient accumulation reduce-scatters every micro-batch (gradients accumulate sharded: least memory);
- the logged loss is the mean over ranks; evaluation runs the same batches on every rank (FSDP2's forward is
  collective); rank 0 alone writes the run directory, the memory report holds every rank's peak;
- checkpoints are DCP folders (`memfit.distributed.checkpoint`: atomic, each rank writes its shards) holding
  also the techniques' loop state and every rank's RNG; they resume on any number of ranks.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memfit import rundir
from memfit.distributed.runtime import DistContext, init_distributed, under_torchrun
from memfit.distributed.support import SUPPORTED, refusal
from memfit.errors import CheckpointError, ConfigError
from memfit.memory.measure import MemoryReport
from memfit.progress import note

CHECKPOINTS = "checkpoints"
LATEST = "latest"


@dataclass(frozen=True)
class Parallel:
    """This rank's part in a distributed run (the loop asks it to split, reduce and gather)."""

    ctx: DistContext

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def world(self) -> int:
        return self.ctx.world_size

    def rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global micro-batch."""
        n = next(iter(batch.values())).shape[0]
        if n % self.world:
            raise ConfigError(f"a batch of {n} rows does not split evenly over {self.world} ranks; make "
                              f"train.batch_size a multiple of {self.world}")
        per = n // self.world
        return {k: v[self.ctx.rank * per:(self.ctx.rank + 1) * per] for k, v in batch.items()}

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t) / self.world

    def total(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t)

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")


def start(device: str = "auto") -> Parallel | None:
    """Join the process group when started by torchrun (else None: a single-process run)."""
    if not under_torchrun():
        return None
    device_type = None if device == "auto" else torch.device(device).type
    par = Parallel(init_distributed(device_type))
    if not par.is_main:  # progress lines come from rank 0 only; warnings still show
        logging.getLogger("memfit").setLevel(logging.WARNING)
    return par


def check(recipe, par: Parallel) -> None:
    """Refuse what cannot run sharded, before building anything (one clear error on every rank)."""
    for t in recipe.techniques():
        if t.slot != "optimizer" and (why := refusal(t)) is not None:  # optimizers: ShardedOptimizer's rules
            allowed = ", ".join(sorted(SUPPORTED.get(t.slot, ()))) or "none"
            raise ConfigError(f"{t.slot} '{t.name}' cannot run on several processes (memfit train --nproc): {why}; "
                              f"supported there: {allowed}")
    from memfit.distributed.shard import offload_policy

    offload_policy(recipe.distributed.offload, par.ctx.device.type)
    cfg = recipe.train
    if cfg.batch_size % par.world:
        raise ConfigError(f"train.batch_size {cfg.batch_size} is the global batch and must split evenly over "
                          f"{par.world} ranks; use a multiple of {par.world}")


def precision_name(precision: str) -> str:
    """The recipe's precision as a `memfit.distributed.shard.PRECISIONS` name (fp32 -> 32-true, bf16 autocast
    on fp32 weights -> bf16-mixed)."""
    return {"fp32": "32-true", "bf16": "bf16-mixed"}.get(precision, precision)


def shard(ctx, recipe, par: Parallel) -> None:
    """`fully_shard` each block and the root of the (technique-applied) model on this rank's mesh."""
    from memfit.distributed.shard import shard_model

    shard_model(ctx.model, par.ctx.mesh, reshard_after_forward=recipe.distributed.reshard_after_forward,
                mp_policy=precision_name(recipe.train.precision), offload=recipe.distributed.offload)


def build_optimizer(opt_tech, ctx):
    """The optimizer slot's optimizer on the sharded parameters (`ShardedOptimizer`; layer-wise outermost)."""
    from memfit.distributed.optim import OWNER, ShardedOptimizer
    from memfit.optim.layerwise import make_layerwise
    from memfit.optim.offload import DiskOffloadTechnique

    disk = opt_tech if isinstance(opt_tech, DiskOffloadTechnique) else None  # sharded first, then offloaded
    sharded = ShardedOptimizer((disk.inner if disk else opt_tech).build_optimizer(ctx), ctx.model)
    slots = list(sharded.slots.values())
    on_host = sharded.mesh.device_type == "cuda" and any(s.param.to_local().device.type == "cpu" for s in slots)
    owned = [s.name for s in slots if s.placement == OWNER]
    if on_host and owned:  # owner steps gather whole matrices over NCCL, which cannot move host tensors
        raise ConfigError(f"optimizer '{opt_tech.name}' steps {len(owned)} matrices whole on one rank (e.g. "
                          f"{owned[0]}), which distributed.offload: cpu cannot feed over NCCL; use adamw or "
                          "adamw_8bit with offload, or offload: none")
    if getattr(opt_tech.config, "layerwise", False):
        return make_layerwise(sharded, ctx.model, max_grad_norm=ctx.grad_clip)
    return disk.wrap(sharded, ctx.model) if disk else sharded


# --- memory ----------------------------------------------------------------------------------------------------
def meter(model, optimizer, par: Parallel):
    from memfit.distributed.measure import RankMeter

    return RankMeter(model, optimizer, rank=par.ctx.rank)


def memory_report(rank_meter, par: Parallel, spec: str) -> MemoryReport:
    """Rank 0's report (its categories at its tensor peak) with every rank's peaks in `notes["ranks"]`."""
    mine = rank_meter.report()
    ranks = par.gather(mine.to_dict())
    peak = mine.breakdown()
    return MemoryReport(peak=peak, category_peaks=replace(peak), process_peak=mine.process_peak,
                        device=par.ctx.device.type,
                        notes={"spec": spec, "world_size": par.world, "ranks": ranks,
                               "per_rank": "tensor bytes of rank 0 by category; every rank's peak in ranks"})


# --- checkpoints ---------------------------------------------------------------------------------------------
def _rng() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng(encoded: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8))


def save(run_dir: Path, built, step: int, history_len: int, par: Parallel) -> Path:
    """Every rank writes its shards of `checkpoints/step-N` (DCP, atomic); rank 0 keeps the newest `keep`."""
    from memfit.distributed import checkpoint

    techniques = {t.name: t.state_dict() for t in built.techniques}
    try:
        json.dumps(techniques)
    except TypeError as exc:
        raise ConfigError(f"a technique's loop state cannot be saved in a distributed checkpoint ({exc})") from None
    extra = {"step": step, "recipe": built.recipe.name, "history_len": history_len, "techniques": techniques,
             "rng": par.gather(_rng())}
    root = run_dir / CHECKPOINTS
    if par.is_main:
        with rundir.writing(root):
            root.mkdir(parents=True, exist_ok=True)
    par.barrier()
    with rundir.writing(root):
        path = checkpoint.save(root / f"step-{step:07d}", built.model, built.ctx.optimizer, extra)
    if par.is_main:
        rundir.write_text_atomic(root / LATEST, path.name)
        for old in _checkpoints(run_dir)[:-built.recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    par.barrier()
    return path


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def resume(run_dir: Path, built, par: Parallel) -> int:
    """Load the newest checkpoint (written by any number of ranks) into model, optimizer, techniques and RNG;
    returns its step."""
    from memfit.distributed import checkpoint

    found = _checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"--resume: {run_dir} has no checkpoint; run without --resume")
    path = found[-1]
    if not (path / checkpoint.META).exists():
        if (path / "model.safetensors").exists():
            raise CheckpointError(f"{path} was written by a single-process run; resume it without --nproc "
                                  "(or start a distributed run with --overwrite)")
        raise CheckpointError(f"{path} is not a complete distributed checkpoint (no {checkpoint.META})")
    extra = checkpoint.load(path, built.model, built.ctx.optimizer)
    for t in built.techniques:
        t.load_state_dict(extra["techniques"].get(t.name, {}))
    saved_rng = extra["rng"]
    _set_rng(saved_rng[par.ctx.rank] if par.ctx.rank < len(saved_rng) else saved_rng[0])
    if par.is_main and len(saved_rng) != par.world:
        note(f"resuming a checkpoint of {len(saved_rng)} ranks on {par.world}")
    return int(extra["step"])


# --- the exported model -------------------------------------------------------------------------------------
def export(run_dir: Path, built, par: Parallel) -> None:
    """Gather the full weights (collective) and let rank 0 save a loadable HF folder `model/`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import PreTrainedModel

    model = built.model
    if not isinstance(model, PreTrainedModel):
        return
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not par.is_main:
        return
    rundir.write_model_folder(run_dir, model, built.data.tokenizer, state_dict=full)
