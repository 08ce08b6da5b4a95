"""Weight-only quantization by format name: the formats memfit ships and the functions recipes, checkpoints and
tests call with a name. Each format is one class in its own file; the algorithm around them is `linear.py`.

| format | codes                        | per-group constants                                  | bytes / param (g=64) |
|--------|------------------------------|------------------------------------------------------|----------------------|
| int8   | int8, symmetric absmax       | fp32 scale                                           | 1 + 4/g              |
| int4   | packed uint4 (2 per byte)    | fp16 scale (rounded up) + uint8 zero point, min/max  | 0.5 + 3/g  = 0.547   |
| nf4    | packed NF4 (QLoRA code book) | int8 absmax; fp32 scale per 256 groups + fp32 mean   | 0.5 + 1/g … = 0.516 |
| dfloat11 | raw sign + mantissa, Huffman-coded exponents (lossless bf16) | int32 offset per 256 codes | ≈ 1.4 (data-dependent) |
| bitstack | K residual sign blocks (1 bit) × rank-r fp16 factors of |residual| | fp16 residual max per row and block | K·(1/8 + 2r(out+in)/(out·in)) |

A new format (DFloat11, BitStack, ...) is a `WeightFormat` subclass in its own file, registered there with
`register(...)`, and imported in `FORMAT_TYPES` below.
"""

from __future__ import annotations

import torch

from memfit.weights.bitstack import BITSTACK
from memfit.weights.dfloat11 import DFLOAT11
from memfit.weights.format import WeightFormat, get_format, pack_nibbles, unpack_nibbles
from memfit.weights.int4 import INT3, INT4
from memfit.weights.int8 import INT8
from memfit.weights.linear import (
    DEFAULT_SKIP,
    QuantLinear,
    quantizable_linears,
    quantize_model,
    quantized_modules,
    set_submodule,
    weight_bytes,
)
from memfit.weights.nf4 import NF4, NF4_CODE

FORMAT_TYPES: tuple[WeightFormat, ...] = (INT8, INT4, INT3, NF4, DFLOAT11, BITSTACK)
FORMATS: tuple[str, ...] = tuple(f.name for f in FORMAT_TYPES)


def effective_group(fmt: str | WeightFormat, in_features: int, group_size: int | None) -> int:
    return get_format(fmt).effective_group(in_features, group_size)


def quantize_tensor(w: torch.Tensor, fmt: str | WeightFormat, group_size: int) -> dict[str, torch.Tensor]:
    """Quantize a 2-D weight with groups of `group_size` input columns (`effective_group` first)."""
    return get_format(fmt).encode(w, group_size)


def dequantize_tensor(fmt: str | WeightFormat, t: dict[str, torch.Tensor], shape: tuple[int, int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return get_format(fmt).decode(t, *shape).to(dtype)


def unit_codes(fmt: str | WeightFormat, t: dict[str, torch.Tensor], out: int, padded_in: int) -> torch.Tensor:
    """The weight divided by its per-group scale, as (out, n_groups, g) float32 (the part PEQA keeps frozen);
    the groups are read off the stored tensors (`padded_in` is accepted for callers that pass it)."""
    return get_format(fmt).unit_codes(t, out)


def error_bound(fmt: str | WeightFormat, t: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Per-element bound on |W - dequant(quant(W))| derived from the stored constants (see each format)."""
    return get_format(fmt).error_bound(t, *shape)


def storage_bytes(fmt: str | WeightFormat, out: int, inp: int, group_size: int | None,
                  has_in_scale: bool = False) -> int:
    """Exact bytes `QuantLinear` stores for an (out, in) weight (bias excluded); the estimate of record."""
    return get_format(fmt).storage_bytes(out, inp, group_size) + (4 * inp if has_in_scale else 0)


__all__ = [
    "DEFAULT_SKIP", "FORMATS", "FORMAT_TYPES", "NF4_CODE", "QuantLinear", "dequantize_tensor", "effective_group",
    "error_bound", "pack_nibbles", "quantizable_linears", "quantize_model", "quantize_tensor", "quantized_modules",
    "set_submodule", "storage_bytes", "unit_codes", "unpack_nibbles", "weight_bytes",
]
