"""What one rank holds under FSDP2, from shapes alone: the sharding rule the estimator will use.

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

Unsharded parameters and all-gather outputs are in the compute dtype (`MixedPrecisionPolicy.param_dtype`),
reduce-scatter inputs in `reduce_dtype`, shards in the storage dtype. Not included: activations, temporaries and
an owner-rank optimizer step's gathered matrix (`memfit.distributed.optim`: one parameter and its gradient, whole).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from memfit.memory.spec import ParamInfo


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
        compute = compute_bytes or p.bytes_per_element
        whole += int(chunk * world * compute)  # FSDP2's unsharded parameter is a view of the padded gather
        gather += int(chunk * world * compute)
        shard += int(chunk * p.bytes_per_element)
        if p.trainable:
            grads += int(p.numel * compute)
            scatter += int(chunk * world * (reduce_bytes or compute))
            grad_shard += int(chunk * p.bytes_per_element)
    return Unit(whole, gather, grads, scatter, shard, grad_shard)


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
