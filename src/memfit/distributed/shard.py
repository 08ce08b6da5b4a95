"""Shard a transformers model with FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder block (or encoder
layer) is one FSDP unit, the root holds what is left (embeddings, final norm, head).

ZeRO stage by `reshard_after_forward` (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models"): True frees each block's gathered parameters after its forward and gathers them again in
backward (ZeRO-3); False keeps them until backward (ZeRO-2 for parameters: more memory, one all-gather less).

Precision: the memfit/Lightning names map onto `MixedPrecisionPolicy` — `param_dtype` is the compute dtype the
gathered parameters are cast to, `reduce_dtype` the dtype gradients are averaged in (fp32 always: the cross-rank
mean then rounds once, as the single-process gradient does). FSDP2 never changes a parameter's *storage*: a frozen
bf16 base under LoRA stays bf16 in its shard (the fp32 upcast of accelerate issue #3844 is checked against here).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from memfit.errors import ConfigError

PRECISIONS: dict[str, torch.dtype] = {
    "32-true": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
}
"""Compute dtype of each precision name ("-mixed": fp32 storage, "-true": storage already in that dtype)."""


def precision_policy(precision: str | MixedPrecisionPolicy) -> MixedPrecisionPolicy:
    """`MixedPrecisionPolicy` for a precision name (a policy passes through unchanged)."""
    if isinstance(precision, MixedPrecisionPolicy):
        return precision
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    # FSDP2 skips the cast for parameters already stored in param_dtype and for non-float (quantized) ones
    return MixedPrecisionPolicy(param_dtype=PRECISIONS[precision], reduce_dtype=torch.float32)


def offload_policy(offload: str, device_type: str) -> CPUOffloadPolicy | None:
    """FSDP2's offload policy for `distributed.offload` (none | cpu) on a `device_type` run; one clear error for
    what cannot work."""
    if offload == "none":
        return None
    if offload != "cpu":
        raise ConfigError(f"unknown distributed.offload '{offload}'; choose none or cpu")
    if device_type != "cuda":
        raise ConfigError("distributed.offload: cpu keeps a GPU run's shards in host memory; this run is on "
                          f"{device_type}, where everything already is; remove it")
    return CPUOffloadPolicy(pin_memory=True)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks: children of every outermost ModuleList of one module class that holds parameters
    (decoder layers, encoder layers, a vision tower's layers; a block's own lists, e.g. MoE experts, stay inside)."""
    lists = _outermost(model, lambda m: isinstance(m, nn.ModuleList) and len(m) > 0
                       and len({type(c) for c in m}) == 1 and any(True for _ in m.parameters()))
    return [(f"{name}.{i}", child) for name, lst in lists for i, child in enumerate(lst)]


def _outermost(model: nn.Module, match) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if match(child):
                found.append((path, child))
            else:
                visit(path, child)

    visit("", model)
    return found


def shard_model(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool | int = True,
                mp_policy: str | MixedPrecisionPolicy = "32-true", offload: str = "none") -> list[str]:
    """`fully_shard` each block and then the root, in place; returns the names of the sharded blocks.

    The model must already be on this rank's device and in its storage dtypes (the precision setup runs first);
    sharding keeps every parameter's dtype and checks it did. `offload="cpu"`: FSDP2's `CPUOffloadPolicy` —
    parameter shards, gradient shards and hence the optimizer state live in host memory, each unit is copied to
    the GPU for its all-gather (CUDA only; not run on a GPU in this project's tests)."""
    if isinstance(model, FSDPModule):
        raise ConfigError("the model is already sharded with FSDP2")
    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no repeated blocks (no ModuleList of layers) to shard one "
                          "by one; FSDP2 needs per-block units to free gathered parameters between blocks")
    policy = precision_policy(mp_policy)
    host = offload_policy(offload, mesh.device_type)
    extra = {"offload_policy": host} if host is not None else {}
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    for _, block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy, **extra)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy, **extra)
    _check_sharded(model, dtypes)
    return [name for name, _ in blocks]


def _check_sharded(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Fail loudly if FSDP2 left a parameter unsharded, sharded it other than on dim 0, or changed its dtype."""
    version = f"torch {torch.__version__}"
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            raise RuntimeError(f"fully_shard left parameter '{name}' unsharded ({version})")
        if tuple(p.placements) != (Shard(0),):
            raise RuntimeError(f"parameter '{name}' is placed {p.placements}, expected (Shard(0),) ({version})")
        if p.dtype != dtypes[name] or p.to_local().dtype != dtypes[name]:
            raise RuntimeError(f"fully_shard changed the storage dtype of '{name}' from {dtypes[name]} to "
                               f"{p.to_local().dtype} ({version})")


def local_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Storage dtype of each parameter's local shard (what each rank keeps between steps)."""
    return {name: (p.to_local() if isinstance(p, DTensor) else p).dtype for name, p in model.named_parameters()}
