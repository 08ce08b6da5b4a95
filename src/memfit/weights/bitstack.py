"""BitStack: weights as a stack of residual sign blocks, so the size is chosen when the model is loaded.

Wang, Zhou, Wang, Yin, Li & Wang 2025 (ICLR), "BitStack: Any-Size Compression of Large Language Models in Variable
Memory Environments". Iterative absolute value decomposition: with R₀ = W, block i stores sign(Rᵢ₋₁) (1 bit per
weight, packed) and a rank-r factorisation uᵢvᵢ of |Rᵢ₋₁| (fp16, the singular values split evenly between u and v);
Rᵢ = Rᵢ₋₁ − sign(Rᵢ₋₁) ⊙ uᵢvᵢ. Each block refines the previous ones, so any prefix of the stack is a model:
`load_quantized(dir, stack=k)` reads only the first k blocks of every layer from the checkpoint, and
`truncate(model, k)` drops blocks of a model already in memory — the memory/quality trade-off is made at load
time, without re-compressing.

Stored per (out, in) weight with `blocks` = K, `rank` = r: `signs` (K, out, ⌈in/8⌉) uint8, `u` (K, out, r) fp16,
`v` (K, r, in) fp16, and `residual_max` (K, out) fp16 — the largest |Rₖ| of each row after k blocks (rounded up),
which is the error bound of a k-block prefix. Bits per weight: K · (1 + 16·r·(out+in)/(out·in)) + 16·K/in.

Departures from the paper (said so, not hidden): no activation-aware scaling of W before the decomposition, and
every layer keeps the same number of blocks (the paper sorts blocks across layers by a calibrated importance).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from memfit.errors import ConfigError
from memfit.weights.base import WeightQuantConfig, WeightQuantTechnique
from memfit.weights.format import StorageLayout, WeightFormat, register

_BITS = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_signs(negative: torch.Tensor) -> torch.Tensor:
    """(…, n) bool -> (…, ⌈n/8⌉) uint8, element j in bit j % 8 of byte j // 8."""
    pad = (-negative.shape[-1]) % 8
    bits = torch.nn.functional.pad(negative.to(torch.uint8), (0, pad)).unflatten(-1, (-1, 8))
    return (bits * _BITS).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_signs` as ±1 float32 (…, n)."""
    negative = (packed.unsqueeze(-1) & _BITS).ne(0).flatten(-2)[..., :n]
    return 1.0 - 2.0 * negative.float()


class BitStackFormat(WeightFormat):
    name = "bitstack"
    stacked: ClassVar[tuple[str, ...]] = ("signs", "u", "v", "residual_max")
    untrainable_scale = "BitStack stores sign blocks and low-rank factors, no per-group scale to train"

    def __init__(self, blocks: int = 4, rank: int = 8) -> None:
        if blocks < 1 or rank < 1:
            raise ConfigError(f"bitstack needs blocks ≥ 1 and rank ≥ 1, got blocks={blocks}, rank={rank}")
        self.blocks, self.rank = blocks, rank

    def layout(self, out: int, inp: int, group_size: int | None) -> StorageLayout:
        k, r = self.blocks, min(self.rank, out, inp)
        return StorageLayout(inp, inp, {"signs": ((k, out, math.ceil(inp / 8)), torch.uint8),
                                        "u": ((k, out, r), torch.float16), "v": ((k, r, inp), torch.float16),
                                        "residual_max": ((k, out), torch.float16)})

    def encode(self, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        residual = w.detach().float().clone()
        r = min(self.rank, *residual.shape)
        signs, us, vs, maxima = [], [], [], []
        for _ in range(self.blocks):
            negative = residual < 0
            u, s, vh = torch.linalg.svd(residual.abs(), full_matrices=False)
            root = s[:r].sqrt()
            u16, v16 = (u[:, :r] * root).half(), (root[:, None] * vh[:r]).half()
            residual -= (1.0 - 2.0 * negative.float()) * (u16.float() @ v16.float())
            m = residual.abs().amax(1)
            m16 = m.half()
            maxima.append(torch.where(m16.float() < m, torch.nextafter(m16, torch.full_like(m16, math.inf)), m16))
            signs.append(pack_signs(negative))
            us.append(u16)
            vs.append(v16)
        return {"signs": torch.stack(signs), "u": torch.stack(us), "v": torch.stack(vs),
                "residual_max": torch.stack(maxima)}

    def decode(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        w = torch.zeros(out, inp)
        for i in range(t["u"].shape[0]):  # one block at a time: one (out, in) temporary, not K
            w.addcmul_(unpack_signs(t["signs"][i], inp), t["u"][i].float() @ t["v"][i].float())
        return w

    def error_bound(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        return t["residual_max"][-1].float()[:, None].expand(out, inp) * (1 + 1e-3) + 1e-7


BITSTACK = register(BitStackFormat())


def truncate(model: nn.Module, blocks: int) -> nn.Module:
    """Keep only the first `blocks` blocks of every BitStack layer (frees the rest), in place."""
    from memfit.weights.linear import quantized_modules

    layers = [m for m in quantized_modules(model).values() if isinstance(m.format, BitStackFormat)]
    if not layers:
        raise ConfigError("truncate: the model has no BitStack layer")
    if blocks < 1:
        raise ConfigError(f"truncate: keep at least one block, got {blocks}")
    for m in layers:
        for name in BitStackFormat.stacked:
            p = getattr(m, name)
            p.data = p.data[:blocks].clone()
    return model


class BitStackConfig(WeightQuantConfig):
    blocks: int = Field(4, ge=1, le=64, description="residual sign blocks stored per layer")
    rank: int = Field(8, ge=1, description="rank of each block's |residual| factorisation")


class BitStackWeights(WeightQuantTechnique):
    name = "bitstack"
    Config = BitStackConfig

    @property
    def format(self) -> WeightFormat:  # type: ignore[override]
        return BitStackFormat(self.config.blocks, self.config.rank)
