"""Block-wise 8-bit quantization of optimizer moments (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization").

Each block of `block_size` consecutive values is scaled by its absolute maximum (one fp32 per block) and every
scaled value is stored as the uint8 index of the nearest entry of a fixed non-linear code. The code is "dynamic":
it spends most levels near 1 and fewer on each smaller decade, so values spanning several orders of magnitude inside
a block (typical of the second moment) keep their relative precision. A quantized moment is two plain tensors in the
optimizer state — `<key>_q` (uint8, the parameter's shape) and `<key>_absmax` (fp32, one per block) — so memory
measurement sees them as optimizer state.
"""

from __future__ import annotations

import math
from functools import cache

import torch

DEFAULT_BLOCK = 256
CHUNK_BLOCKS = 256
"""Blocks (de)quantized at once by `chunked_spans`: 65,536 values, so an 8-bit step's fp32 temporaries are a few
hundred KiB however large the parameter is."""


def _build_code(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted code values in [-1, 1] (signed) or [0, 1] (unsigned), and the midpoints between them."""
    decades = 7 if signed else 8  # 127 (+ mirrored) or 255 positive levels, plus zero
    levels = []
    for k in range(decades):
        count = 2 ** (decades - 1 - k)
        hi, lo = 10.0**-k, 10.0 ** -(k + 1)
        levels.append(torch.linspace(lo, hi, count + 1, dtype=torch.float64)[1:])
    positive = torch.cat(levels)
    values = torch.cat([-positive, torch.zeros(1, dtype=torch.float64), positive]) if signed else torch.cat(
        [torch.zeros(1, dtype=torch.float64), positive])
    values = values.sort().values.float()
    return values, (values[1:] + values[:-1]) / 2


# Built at import, outside any measured region, so the tables never count as optimizer state.
_CODES = {signed: _build_code(signed) for signed in (True, False)}


@cache
def _code_on(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    values, midpoints = _CODES[signed]
    return values.to(device), midpoints.to(device)


def _code(signed: bool, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return _code_on(signed, torch.device(device))


def num_blocks(numel: int, block_size: int = DEFAULT_BLOCK) -> int:
    return math.ceil(numel / block_size)


def quantized_bytes(numel: int, block_size: int = DEFAULT_BLOCK) -> int:
    """Bytes of one quantized tensor: one uint8 per value plus one fp32 scale per block."""
    return numel + 4 * num_blocks(numel, block_size)


def quantize(x: torch.Tensor, block_size: int = DEFAULT_BLOCK, signed: bool = True) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """`x` -> (uint8 codes shaped like `x`, fp32 absmax per block)."""
    flat = x.detach().reshape(-1).to(torch.float32, copy=True)
    codes = torch.empty(flat.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(num_blocks(flat.numel(), block_size), device=x.device)
    _encode(flat, block_size, signed, codes, absmax)
    return codes.view(x.shape), absmax


def _split_blocks(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`flat` as a (whole blocks, block_size) view and its tail (the last, partial block; maybe empty). Views, so
    block-wise ops need no padded copy."""
    whole = flat.numel() // block_size * block_size
    return flat[:whole].view(-1, block_size), flat[whole:]


def _encode(flat: torch.Tensor, block_size: int, signed: bool, codes: torch.Tensor, absmax: torch.Tensor) -> None:
    """Quantize the contiguous fp32 values `flat` into `codes` (uint8, flat) and `absmax` (one per block).
    `flat` is consumed: it is scaled to [-1, 1] in place (one pass fewer than a scaled copy)."""
    body, tail = _split_blocks(flat, block_size)
    torch.amax(body.abs(), dim=1, out=absmax[:body.shape[0]])
    if tail.numel():
        absmax[-1] = tail.abs().amax()
    scale = absmax.clamp_min(torch.finfo(torch.float32).tiny)
    body.div_(scale[:body.shape[0]].unsqueeze(1))
    if tail.numel():
        tail.div_(scale[-1])
    nearest_code(flat, signed, out=codes)


_BIN_SHIFT = 15
"""x is binned by the top 17 bits of its fp32 pattern (sign, exponent, 8 mantissa bits: bins 0.4 % wide), fine
enough that no bin holds two midpoints of either code (checked when the table is built)."""
_BINS = 1 << (32 - _BIN_SHIFT)
_SIGN_OFFSET = _BINS // 2
"""`pattern >> 15` (arithmetic) is in [-65536, 65536): negative for negative values; the offset makes it an index."""


@cache
def _bin_table(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bin (index = pattern >> 15 + offset): how many midpoints lie below the bin's smallest value (uint8),
    and the one midpoint inside the bin's range (inf if none). Negative bins run from -0.0 downwards, so their
    smallest value is at the high end of the pattern range; NaN patterns count as the infinity of their sign."""
    _, midpoints = _code_on(signed, torch.device("cpu"))
    bins = torch.arange(-_SIGN_OFFSET, _SIGN_OFFSET, dtype=torch.int32)
    lo = (bins << _BIN_SHIFT).view(torch.float32)
    hi = ((bins << _BIN_SHIFT) | ((1 << _BIN_SHIFT) - 1)).view(torch.float32)
    negative = bins < 0
    inf = torch.where(negative, float("-inf"), float("inf"))
    vmin, vmax = torch.where(negative, hi, lo), torch.where(negative, lo, hi)
    vmin, vmax = torch.where(vmin.isnan(), inf, vmin), torch.where(vmax.isnan(), inf, vmax)
    below = torch.searchsorted(midpoints, vmin)  # midpoints strictly below the bin
    inside = torch.searchsorted(midpoints, vmax, right=True) - below
    if int(inside.max()) > 1:
        raise AssertionError("quantization bins too coarse for the code")  # a bug, not a user error
    padded = torch.cat([midpoints, midpoints.new_tensor([float("inf")])])
    threshold = torch.where(inside == 1, padded[below], float("inf"))
    return below.to(torch.uint8).to(device), threshold.to(device)


def nearest_code(scaled: torch.Tensor, signed: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Index (uint8) of the nearest code value for each of `scaled` (in [-1, 1]), equal to
    `torch.bucketize(scaled, midpoints)` but two table lookups instead of a binary search: a value's bin gives the
    count of midpoints below it, plus one if it lies above the bin's midpoint. `out`: a contiguous uint8 tensor
    with as many elements, written in place."""
    count, threshold = _bin_table(signed, scaled.device)
    values = scaled.reshape(-1)
    bins = (values.view(torch.int32) >> _BIN_SHIFT).add_(_SIGN_OFFSET)
    codes = count.index_select(0, bins)
    above = values > threshold.index_select(0, bins)
    if out is None:
        return codes.add_(above).view(scaled.shape)
    torch.add(codes, above, out=out.view(-1))
    return out


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = DEFAULT_BLOCK, signed: bool = True,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize` (up to the code's rounding)."""
    values, _ = _code(signed, codes.device)
    flat = values.index_select(0, codes.reshape(-1).int())  # index_select: several times faster than values[long]
    body, tail = _split_blocks(flat, block_size)
    body.mul_(absmax[:body.shape[0]].unsqueeze(1))
    if tail.numel():
        tail.mul_(absmax[-1])
    return flat.view(codes.shape).to(dtype)


for _signed in (True, False):  # built at import, outside any measured region (like the codes)
    _bin_table(_signed, torch.device("cpu"))


def init_moment(state: dict, key: str, like: torch.Tensor, block_size: int = DEFAULT_BLOCK) -> None:
    """Zero moment `key` stored quantized in `state` (`<key>_q`, `<key>_absmax`)."""
    state[f"{key}_q"] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
    # code index of 0.0: the middle of the signed code, the first entry of the unsigned one
    state[f"{key}_q"].fill_(_zero_index(key_signed(key)))
    state[f"{key}_absmax"] = torch.zeros(num_blocks(like.numel(), block_size), device=like.device)


def key_signed(key: str) -> bool:
    """Second moments (`exp_avg_sq`) are non-negative and use the unsigned code."""
    return not key.endswith("_sq")


def _zero_index(signed: bool) -> int:
    values, _ = _code(signed)
    return int((values == 0).nonzero()[0])


def chunked_spans(numel: int, block_size: int = DEFAULT_BLOCK,
                  chunk_blocks: int = CHUNK_BLOCKS) -> list[tuple[int, int]]:
    """`(start, end)` value ranges covering `numel`, each starting on a block boundary."""
    step = block_size * chunk_blocks
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def _moment_parts(state: dict, key: str, block_size: int,
                  span: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    codes, absmax = state[f"{key}_q"], state[f"{key}_absmax"]
    if span is None:
        return codes, absmax
    start, end = span
    return codes.view(-1)[start:end], absmax[start // block_size:num_blocks(end, block_size)]


def load_moment(state: dict, key: str, block_size: int = DEFAULT_BLOCK, dtype: torch.dtype = torch.float32,
                span: tuple[int, int] | None = None) -> torch.Tensor:
    """Moment `key` dequantized: whole (shaped like the parameter) or the flat values `span` of `chunked_spans`."""
    codes, absmax = _moment_parts(state, key, block_size, span)
    return dequantize(codes, absmax, block_size, key_signed(key), dtype)


def store_moment(state: dict, key: str, value: torch.Tensor, block_size: int = DEFAULT_BLOCK,
                 span: tuple[int, int] | None = None) -> None:
    """Quantize `value` into moment `key` (whole, or the flat values `span`). `value` is consumed: an fp32
    contiguous one is scaled in place."""
    stored_codes, stored_absmax = _moment_parts(state, key, block_size, span)
    _encode(value.detach().reshape(-1).float(), block_size, key_signed(key), stored_codes.view(-1), stored_absmax)
