"""Precision policies, named as PyTorch Lightning names them (`Trainer(precision=...)`).

| name         | trained weights + gradients | matmuls / activations | loss scaling            |
|--------------|-----------------------------|-----------------------|-------------------------|
| `32-true`    | fp32                        | fp32                  | —                       |
| `bf16-mixed` | fp32                        | bf16 (autocast)       | —                       |
| `bf16-true`  | bf16                        | bf16                  | —                       |
| `16-mixed`   | fp32                        | fp16 (autocast)       | dynamic (`GradScaler`)  |
| `16-true`    | fp16                        | fp16                  | —                       |

One `Precision` object answers every dtype question a run and its estimate ask: the storage dtype of the parameters
that train (and so of their gradients and, in `torch.optim`, of their optimizer state), the compute dtype, whether
autocast runs and whether the loss is scaled. The recipe's `train.precision` selects it, `train.build.run_spec`
puts it on the `RunSpec`, and the build casts what trains to `storage` exactly where `estimate_step` does
(`cast_trainable`), so the two cannot disagree. Frozen weights are never cast: a LoRA/QLoRA base keeps the dtype
the model was loaded in (`model.dtype`, default: this storage dtype).

Old names keep working: `fp32` → `32-true`, `bf16` → `bf16-mixed` (fp32 weights under bf16 autocast, what `bf16`
always meant here), `fp16` → `16-mixed`, and Lightning's short forms `32`, `16`.

`bf16-true` / `16-true` options (`train.master_weights`): `fp32` keeps an fp32 master copy of the trained
parameters in the optimizer (Micikevicius et al. 2018, "Mixed Precision Training"); `none` (default) rounds each
update stochastically into the 16-bit weight (Zamirai et al. 2020, "Revisiting BFloat16 Training";
`optim/precision.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.errors import ConfigError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """One precision policy: dtype names as `RunSpec` uses them (fp32, bf16, fp16)."""

    name: str
    storage: str  # trained parameters, their gradients (and torch.optim's state of them)
    compute: str  # matmul inputs and outputs: the autocast dtype under -mixed, the storage dtype under -true
    loss_scaling: bool = False  # dynamic loss scaling (torch.amp.GradScaler)

    @property
    def autocast(self) -> bool:
        return self.compute != self.storage

    @property
    def true_low(self) -> bool:
        """Weights are stored in 16 bits and trained there (`-true` below 32 bits): master weights apply."""
        return not self.autocast and self.storage != "fp32"

    @property
    def storage_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.storage]

    @property
    def compute_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.compute]

    def autocast_context(self, device: torch.device):
        """`torch.autocast` to the compute dtype under a -mixed policy, else a do-nothing context."""
        from contextlib import nullcontext

        if not self.autocast:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("32-true", "fp32", "fp32"),
    Precision("bf16-mixed", "fp32", "bf16"),
    Precision("bf16-true", "bf16", "bf16"),
    Precision("16-mixed", "fp32", "fp16", loss_scaling=True),
    Precision("16-true", "fp16", "fp16"),
)}

ALIASES = {"fp32": "32-true", "32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed", "16": "16-mixed"}
"""Earlier memfit names and Lightning's short forms."""


def precision(name: str | Precision) -> Precision:
    """The policy of a precision name (new or old); an unknown name is one `ConfigError` naming the choices."""
    if isinstance(name, Precision):
        return name
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRECISIONS:
        old = ", ".join(f"{a} = {b}" for a, b in ALIASES.items())
        raise ConfigError(f"unknown precision '{name}'; choose one of: {', '.join(PRECISIONS)} (older names: {old})")
    return PRECISIONS[key]


def legacy(param_dtype: str, compute_dtype: str) -> Precision:
    """The policy a spec written with dtype names only (no precision) describes."""
    if compute_dtype == "fp32" or param_dtype == compute_dtype:
        return PRECISIONS.get({"fp32": "32-true", "bf16": "bf16-true", "fp16": "16-true"}.get(compute_dtype, ""),
                              PRECISIONS["32-true"])
    return PRECISIONS["16-mixed" if compute_dtype == "fp16" else "bf16-mixed"]


def dtype_of_name(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; choose one of: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]
