"""Quantized and streamed weights: int8 / int4 / NF4 / AWQ `QuantLinear`s, QLoRA and PEQA bases, streaming.

API for the rest of memfit (e.g. `memfit generate`):

- `apply_weights(model, fmt, group_size=None, calibration=None)` quantizes a model in place (fmt: int8, int4,
  int3, nf4, awq; awq needs calibration token ids).
- `save_quantized(model, dir)` / `load_quantized(dir)` round-trip through safetensors.
- `memfit.weights.streaming.StreamedModel.from_pretrained(dir, window=2)` generates with layers streamed from disk.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.weights.io import load_quantized, save_quantized
from memfit.weights.quant import (
    DEFAULT_SKIP,
    FORMATS,
    QuantLinear,
    quantize_model,
    quantized_modules,
    storage_bytes,
    weight_bytes,
)

WEIGHT_FORMATS = (*FORMATS, "awq")


def apply_weights(model: nn.Module, fmt: str, group_size: int | None = None,
                  calibration: torch.Tensor | Iterable | None = None,
                  skip: Iterable[str] = DEFAULT_SKIP) -> nn.Module:
    """Quantize `model`'s linear layers in place to `fmt`; `awq` searches scales on `calibration` token ids."""
    if fmt == "awq":
        if calibration is None:
            raise ConfigError("weights 'awq' needs calibration text (token ids); pass calibration=...")
        from memfit.weights.awq import awq_quantize

        return awq_quantize(model, calibration, group_size=group_size, skip=tuple(skip))
    if fmt not in FORMATS:
        raise ConfigError(f"unknown weight format '{fmt}'; choose one of: {', '.join(WEIGHT_FORMATS)}")
    return quantize_model(model, fmt, group_size, skip=tuple(skip))


__all__ = [
    "WEIGHT_FORMATS", "QuantLinear", "apply_weights", "load_quantized", "quantize_model", "quantized_modules",
    "save_quantized", "storage_bytes", "weight_bytes",
]
