"""Which techniques run on several processes (FSDP2, `memfit train --nproc N`): the one list `train.parallel`
refuses by and the planner plans by (`memfit plan --nproc N`). Kept free of torch.distributed imports, so the
planner reads it without loading the distributed stack."""

from __future__ import annotations

SUPPORTED = {
    "step": {"backprop"},
    "adapter": {"lora", "dora", "qlora"},
    "activations": {"checkpointing", "chunked_ce"},
}
"""Techniques verified under FSDP2 in a full run (tests/distributed); optimizers are checked by `ShardedOptimizer`
(every one with a sharding rule, `SHARDED_OPTIMIZERS`). Anything else is refused rather than run unverified."""

SHARDED_OPTIMIZERS = ("adamw", "adamw_8bit", "adam_mini", "galore", "galore_8bit", "natural_galore", "apollo",
                      "apollo_mini", "frugal", "scale", "sgd")
"""Optimizers `memfit.distributed.optim.RULES` places on dim-0 shards (torch's AdamW / SGD and memfit's 8-bit AdamW,
GaLore family, SCALE, Adam-mini); any other is refused when the optimizer is built."""

WHY_NOT = {
    "lisa": "layer samplers switch parameters' requires_grad between steps, and FSDP2 fixes it per parameter at its "
            "first all-gather (the gathered copy keeps the old flag), so deactivated layers would still train",
    "weights": "the weights slot is for frozen (inference) models",
    "optimizer": "it has no FSDP2 placement rule (memfit.distributed.optim.RULES)",
}
WHY_NOT.update({name: WHY_NOT["lisa"] for name in ("badam", "owlore", "ist")})


def refusal(technique) -> str | None:
    """Why `technique` cannot run on several processes, or None when it can."""
    slot, name = technique.slot, technique.name
    if slot == "weights":
        return WHY_NOT["weights"]
    if slot == "optimizer" and name not in SHARDED_OPTIMIZERS:
        return WHY_NOT["optimizer"]
    if slot in SUPPORTED and name not in SUPPORTED[slot]:
        return WHY_NOT.get(name) or "not verified under FSDP2 yet"
    return None
