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
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = num_blocks(n, block_size)
    padded = torch.nn.functional.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    scaled = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = nearest_code(scaled, signed).to(torch.uint8)
    return codes.view(-1)[:n].view(x.shape), absmax


_BIN_SHIFT = 15
"""|x| is binned by the top 17 bits of its fp32 pattern (exponent + 8 mantissa bits: bins 0.4 % wide), fine enough
that no bin holds two midpoints of either code (checked when the table is built)."""


@cache
def _bin_table(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bin of |x| in [0, 1]: how many midpoints lie below the bin's first value, and the first midpoint at or
    above it (inf if none)."""
    _, midpoints = _code_on(signed, device)
    last = int(torch.tensor(1.0).view(torch.int32)) >> _BIN_SHIFT
    starts = (torch.arange(last + 2, dtype=torch.int32) << _BIN_SHIFT).view(torch.float32).to(device)
    below = torch.searchsorted(midpoints, starts)  # midpoints strictly below each bin start
    if int((below[1:] - below[:-1]).max()) > 1:
        raise AssertionError("quantization bins too coarse for the code")  # a bug, not a user error
    padded = torch.cat([midpoints, midpoints.new_tensor([float("inf")])])
    return below[:-1].to(torch.int16), padded[below[:-1]]


def nearest_code(scaled: torch.Tensor, signed: bool) -> torch.Tensor:
    """Index of the nearest code value for each of `scaled` (in [-1, 1]), equal to
    `torch.bucketize(scaled, midpoints)` but a table lookup instead of a binary search (2-3x faster on CPU).
    The signed code is symmetric, so a negative value's index mirrors its magnitude's."""
    below, first = _bin_table(signed, scaled.device)
    magnitude = scaled.abs()
    bins = (magnitude.view(torch.int32) >> _BIN_SHIFT).clamp_(max=below.numel() - 1)  # inf/nan: last bin
    cand = first.index_select(0, bins.view(-1)).view_as(bins)
    index = below.index_select(0, bins.view(-1)).view_as(bins) + (magnitude > cand)
    if not signed:
        return index
    n_mid = _code_on(True, scaled.device)[1].numel()
    return torch.where(scaled < 0, n_mid - index - (magnitude == cand).to(index.dtype), index)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = DEFAULT_BLOCK, signed: bool = True,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize` (up to the code's rounding)."""
    values, _ = _code(signed, codes.device)
    flat = values[codes.reshape(-1).long()]
    n = flat.numel()
    blocks = absmax.numel()
    padded = torch.nn.functional.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)
    return (padded * absmax.unsqueeze(1)).view(-1)[:n].view(codes.shape).to(dtype)


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
    codes, absmax = quantize(value, block_size, key_signed(key))
    stored_codes, stored_absmax = _moment_parts(state, key, block_size, span)
    stored_codes.copy_(codes)
    stored_absmax.copy_(absmax)
