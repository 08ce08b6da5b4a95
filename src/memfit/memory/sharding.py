"""What one rank holds under FSDP2, from shapes alone (`memfit train --nproc N`; `memfit estimate --nproc N`).

Lives in `memory/` (it needs only shapes), so the estimator and the planner use it without importing the
distributed runtime; `memfit.distributed` measures what it predicts.

ZeRO (Rajbhandari et al. 2020) splits parameters, gradients and optimizer state across N ranks; FSDP2 does it per
unit (each decoder block, and the root with embeddings, final norm and head). Per rank, between steps:

    parameters  sum over parameters of ceil(rows / N) * row_bytes       (FSDP2 pads every shard to the same rows)
    optimizer   this rank's state (elementwise optimizers: state / N)    (passed in: each optimizer knows its own)
    gradients   the same padded shards, from the end of backward until zero_grad

plus, while a step runs, the units in flight (verified against torch's FSDPMemTracker in tests/distributed):

    forward of block k     root + the unsharded block k + the all-gather outputs of blocks k-1 and k
                           (FSDP2 frees a block's all-gather output only after the next block's copy-out)
    backward of block k    root + the unsharded block k + block k-1's prefetched all-gather output
                           + block k's unsharded gradients + block k+1's reduce-scatter input (FSDP2 frees it
                           only at the next reduce-scatter) + the sharded gradients of blocks already reduced;
                           then, resharded, block k's gradients are copied into its own reduce-scatter input
    ZeRO-3  (reshard_after_forward=True)  blocks are freed after their forward and gathered again in backward
    ZeRO-2  (reshard_after_forward=False) every block gathered in forward stays until its backward
    The root is never resharded between forward and backward (FSDP2 keeps it for the backward).

Unsharded parameters and all-gather outputs are in the compute dtype (`MixedPrecisionPolicy.param_dtype`; a
quantized weight's integer codes as stored: FSDP2 casts only floating parameters),
reduce-scatter inputs in `reduce_dtype`, shards in the storage dtype. Not included: activations, temporaries and
an owner-rank optimizer step's gathered matrix (`memfit.distributed.optim`: one parameter and its gradient, whole).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import ParamInfo, RunSpec


@dataclass(frozen=True)
class Unit:
    """One `fully_shard` unit's parameter bytes, whole and as one rank's padded shard."""

    params: int  # unsharded (padded rows), compute dtype
    all_gather: int  # padded all-gather output, compute dtype
    grads: int  # unsharded gradients of trainable parameters, compute dtype
    reduce_scatter: int  # padded reduce-scatter input, reduce dtype
    sharded_params: int  # this rank's padded shard, storage dtype
    sharded_grads: int  # this rank's padded gradient shard, storage dtype


def padded_rows(rows: int, world: int) -> int:
    return math.ceil(rows / world)


def unit_bytes(params: Iterable[ParamInfo], world: int, compute_bytes: float | None = None,
               reduce_bytes: float | None = None) -> Unit:
    """Bytes of one unit on one rank; `compute_bytes`/`reduce_bytes` per element default to the storage's."""
    whole = gather = grads = scatter = shard = grad_shard = 0
    for p in params:
        rows = p.shape[0] if p.shape else 1
        row_numel = p.numel // rows if rows else 0
        chunk = padded_rows(rows, world) * row_numel
        # FSDP2 casts only floating parameters to `param_dtype`: a quantized weight's integer codes (NF4/int4
        # packed bytes, int8) are gathered as stored (torch's FSDPParam.init_dtype_attrs)
        compute = compute_bytes if compute_bytes and not _integer_codes(p) else p.bytes_per_element
        whole += int(chunk * world * compute)  # FSDP2's unsharded parameter is a view of the padded gather
        gather += int(chunk * world * compute)
        shard += int(chunk * p.bytes_per_element)
        if p.trainable:
            grads += int(p.numel * compute)
            scatter += int(chunk * world * (reduce_bytes or compute))
            grad_shard += int(chunk * p.bytes_per_element)
    return Unit(whole, gather, grads, scatter, shard, grad_shard)


def _integer_codes(p: ParamInfo) -> bool:
    """A quantized weight's integer storage (memfit's formats keep codes in uint8/int8, scales in 2-4 byte floats)."""
    return p.quantized and p.bytes_per_element <= 1


def units_from_params(params: Iterable[ParamInfo], blocks: list[str]) -> tuple[list[ParamInfo], list[list[ParamInfo]]]:
    """Split parameters into the root unit and one list per block (`blocks`: module names, e.g. from
    `memfit.distributed.shard.find_blocks`), in forward order."""
    per_block: list[list[ParamInfo]] = [[] for _ in blocks]
    root = []
    for p in params:
        for i, block in enumerate(blocks):
            if p.name.startswith(block + "."):
                per_block[i].append(p)
                break
        else:
            root.append(p)
    return root, per_block


def sharded_bytes(root: list[ParamInfo], blocks: list[list[ParamInfo]], world: int, optimizer_bytes: int,
                  reshard_after_forward: bool = True, compute_bytes: float | None = None,
                  reduce_bytes: float | None = None) -> dict[str, int | str]:
    """One rank's parameters, gradients, optimizer state and in-flight units under FSDP2.

    Returns the held shards (`parameters`, `gradients`, `optimizer`) and `model_state_peak`: the most those plus
    the gathered units and communication buffers reach at any moment of a step (`peak_phase` says where)."""
    r = unit_bytes(root, world, compute_bytes, reduce_bytes)
    units = [unit_bytes(b, world, compute_bytes, reduce_bytes) for b in blocks]
    shards = r.sharded_params + sum(u.sharded_params for u in units)
    grad_shards = r.sharded_grads + sum(u.sharded_grads for u in units)
    held = shards + optimizer_bytes
    phases: dict[str, int] = {"root forward": held + r.params + r.all_gather}
    resident = r.params  # unsharded and kept: the root always, every earlier block under ZeRO-2
    for k, u in enumerate(units):
        previous_gather = units[k - 1].all_gather if k else 0
        phases[f"forward {k}"] = held + resident + u.params + previous_gather + u.all_gather
        if not reshard_after_forward:
            resident += u.params
    reduced = deferred = 0
    for k in reversed(range(len(units))):
        u = units[k]
        if reshard_after_forward:
            gathered = u.params + (units[k - 1].all_gather if k else 0)
        else:
            gathered = resident - r.params
            resident -= u.params
        base = held + r.params + reduced
        phases[f"backward {k}"] = base + gathered + u.grads + deferred
        phases[f"reduce-scatter {k}"] = base + gathered - u.params + u.grads + u.reduce_scatter
        reduced += u.sharded_grads
        deferred = u.reduce_scatter
    phases["root backward"] = held + r.params + r.grads + deferred + reduced
    phases["root reduce-scatter"] = held + r.grads + r.reduce_scatter + reduced
    phases["optimizer step"] = held + grad_shards
    phase = max(phases, key=phases.__getitem__)
    return {"parameters": shards, "gradients": grad_shards, "optimizer": optimizer_bytes,
            "model_state_peak": phases[phase], "peak_phase": phase}


_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def block_names(params: Iterable[ParamInfo | str]) -> list[str]:
    """The FSDP2 units `shard_model` makes, read off parameter names: each child of the outermost numbered list
    (`model.layers.3`, `base_model.model.model.layers.3`), in order."""
    names: list[str] = []
    for p in params:
        m = _BLOCK.match(p if isinstance(p, str) else p.name)
        if m and m.group(1) not in names:
            names.append(m.group(1))
    return names


@dataclass(frozen=True)
class RankEstimate:
    """One rank's predicted memory in an FSDP2 run of N ranks."""

    world: int
    breakdown: MemoryBreakdown  # per-rank category peaks: shards, state / N, activations at the per-rank batch,
    # FSDP2's gathered units and buffers in `other`
    peak: int  # predicted tensor peak of a step on one rank
    model_state_peak: int  # shards + state + gathered units + buffers at their worst moment
    peak_phase: str
    whole: MemoryBreakdown  # one process, the whole batch (what the ranks split)

    def to_dict(self) -> dict:
        return {"world": self.world, "breakdown": self.breakdown.to_dict(), "peak": self.peak,
                "model_state_peak": self.model_state_peak, "peak_phase": self.peak_phase,
                "whole": self.whole.to_dict()}


def estimate_rank(spec: RunSpec, parts: Sequence, world: int, reshard_after_forward: bool = True) -> RankEstimate:
    """Per-rank memory of `spec` (global batch `spec.batch`) with `parts` applied, sharded over `world` ranks.

    Each rank runs the step on `batch / world` rows, holding padded shards of parameters and gradients, 1/N of
    the optimizer state (elementwise state is sharded with its parameter; an owner-rank matrix's state sits on
    one rank, balanced greedily — averaged here), and FSDP2's units in flight (`sharded_bytes`). The step peak is
    the single-process step peak at the per-rank batch with its whole parameters, gradients and state replaced
    by the sharded model-state peak (they coincide in a step's backward, where both peak)."""
    from memfit.memory.estimate import estimate_step, fixed_bytes, step_phases

    if world < 1 or spec.batch % world:
        raise ConfigError(f"the global batch {spec.batch} must split evenly over {world} ranks")
    whole, _ = estimate_step(spec, parts)
    ordered = sorted(parts, key=lambda p: p.order)
    local = replace(spec, batch=spec.batch // world)
    for part in ordered:
        local = part.transform_spec(local)
    per_rank, _ = estimate_step(replace(spec, batch=spec.batch // world), parts)
    phases = step_phases(local, per_rank, ordered)
    root, blocks = units_from_params(local.model.params, block_names(local.model.params))
    compute = 2 if spec.compute_dtype in ("bf16", "fp16") else None
    optimizer = math.ceil(whole.optimizer / world)
    rank = sharded_bytes(root, blocks, world, optimizer, reshard_after_forward, compute_bytes=compute,
                         reduce_bytes=4 if compute else None)
    # the loss head (end of forward, start of backward): the single-process phase at the per-rank batch with its
    # whole weights and state replaced by this rank's shards + state, the gathered root, and the last block
    # gathered (ZeRO-3: its parameters and its all-gather output; ZeRO-2: every block's parameters)
    r = unit_bytes(root, world, compute, 4 if compute else None)
    units = [unit_bytes(b, world, compute, 4 if compute else None) for b in blocks]
    gathered = (units[-1].params + units[-1].all_gather if reshard_after_forward
                else sum(u.params for u in units)) if units else 0
    held = rank["parameters"] + optimizer + per_rank.buffers + per_rank.kv_cache + per_rank.other
    head = max((phases[k] for k in ("forward_head", "backward_start") if k in phases), default=0)
    head_phase = head - fixed_bytes(per_rank) + held + r.params + gathered
    if spec.grad_accum > 1:  # earlier micro-batches' gradients: reduce-scattered, so held as shards
        head_phase += rank["gradients"] - per_rank.gradients
    peak = max(head_phase, rank["model_state_peak"] + per_rank.buffers)
    breakdown = replace(per_rank, parameters=rank["parameters"], gradients=rank["gradients"], optimizer=optimizer,
                        other=per_rank.other + r.params + gathered)
    return RankEstimate(world, breakdown, peak, rank["model_state_peak"], rank["peak_phase"], whole)
