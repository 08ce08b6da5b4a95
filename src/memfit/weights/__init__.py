"""Quantized and streamed weights: int8 / int4 / NF4 / AWQ `QuantLinear`s, QLoRA and PEQA bases, streaming.

Layout: `format.py` (a storage format as a type) ← `int8.py`, `int4.py`, `nf4.py` (one format each, with its
`weights` technique) ; `linear.py` (`QuantLinear` and quantizing models, written once for every format);
`quant.py` (the formats by name); `awq.py`, `qlora.py`, `peqa.py` (methods over a format); `io.py`,
`streaming.py` (checkpoints).

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
from memfit.weights.awq import awq_quantize
from memfit.weights.embedding import quantize_embeddings
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

CALIBRATED = {"awq": awq_quantize}
"""Quantizers that search per-layer constants on calibration token ids, over a format (AWQ: int4)."""
WEIGHT_FORMATS = (*FORMATS, *CALIBRATED)


def apply_weights(model: nn.Module, fmt: str, group_size: int | None = None,
                  calibration: torch.Tensor | Iterable | None = None,
                  skip: Iterable[str] = DEFAULT_SKIP, embeddings: bool = False) -> nn.Module:
    """Quantize `model`'s linear layers in place to the format `fmt`, or with a calibrated quantizer (`awq`)
    that searches its constants on `calibration` token ids. `embeddings=True` also stores the embedding tables
    and the output layer in the format (AWQ: its plain int4 format)."""
    calibrated = CALIBRATED.get(fmt)
    if calibrated is not None:
        if calibration is None:
            raise ConfigError(f"weights '{fmt}' needs calibration text (token ids); pass calibration=...")
        calibrated(model, calibration, group_size=group_size, skip=tuple(skip))
        fmt = "int4"
    elif fmt not in FORMATS:
        raise ConfigError(f"unknown weight format '{fmt}'; choose one of: {', '.join(WEIGHT_FORMATS)}")
    else:
        quantize_model(model, fmt, group_size, skip=tuple(skip))
    if embeddings:
        quantize_embeddings(model, fmt, group_size)
    return model


__all__ = [
    "WEIGHT_FORMATS", "QuantLinear", "apply_weights", "load_quantized", "quantize_model", "quantized_modules",
    "save_quantized", "storage_bytes", "weight_bytes",
]
