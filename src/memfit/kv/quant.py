"""Asymmetric min-max integer quantization with bit packing (the math under KIVI-style KV quantization).

`quantize(x, bits, dim)` maps every group (the elements along `dim`) to integers 0 … 2^bits - 1 with its own scale
and minimum; |x - dequantize(...)| ≤ scale / 2 element-wise. `pack` stores 8 / bits integers per byte along the last
dimension, so 2-bit codes take a quarter of a byte each.
"""

from __future__ import annotations

import torch

EPS = 1e-8


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8, scale, minimum); scale and minimum keep `dim` with size 1, in `x`'s dtype."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(EPS)
    codes = torch.round((x - lo) / scale).clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale + lo


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of `bits` bits, 8 // bits per byte, along the last dimension (its size must divide)."""
    per = 8 // bits
    if per == 1:
        return codes
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.view(*packed.shape[:-1], packed.shape[-1] * per)
