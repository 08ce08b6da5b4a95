"""int4 (and int3) group-wise weight-only quantization: asymmetric min/max per group of input columns, codes
packed two per byte.

Dettmers & Zettlemoyer 2023, "The case for 4-bit precision: k-bit Inference Scaling Laws" (small block sizes make
4-bit the bit-optimal choice); the group-wise asymmetric grid (scale + zero point) is the one GPTQ (Frantar et al.
2023) and AWQ (Lin et al. 2024) store. Bound: |W − Ŵ| ≤ s/2 per group. Per group an fp16 scale (rounded up, so
that 2^bits − 1 steps still cover [min, max]) and a uint8 zero point: 0.5 + 3/group_size bytes per parameter.
int3 uses a 3-bit grid in the same nibbles (AWQ and PEQA offer it; not bit-packed, so the same bytes).
"""

from __future__ import annotations

import math

import torch

from memfit.weights.base import WeightQuantTechnique
from memfit.weights.format import GroupwiseFormat, TensorSpecs, decode_nibbles, pack_nibbles, register


class UIntFormat(GroupwiseFormat):
    """Unsigned `bits`-bit codes with a per-group fp16 scale and uint8 zero point (zero is in every range)."""

    default_group = 64
    codes_per_byte = 2
    scale_name = "scale"

    def tensor_specs(self, out: int, padded_in: int, n_groups: int) -> TensorSpecs:
        return {"qweight": ((out, padded_in // 2), torch.uint8), "scale": ((out, n_groups), torch.float16),
                "zero": ((out, n_groups), torch.uint8)}

    def quantize_groups(self, wg: torch.Tensor) -> dict[str, torch.Tensor]:
        qmax = 2 ** self.bits - 1
        lo = wg.amin(-1).clamp_max(0)
        hi = wg.amax(-1).clamp_min(0)
        scale = ((hi - lo) / qmax).clamp_min(1e-7)
        s16 = scale.half()
        # round the fp16 scale up so that qmax steps still cover [lo, hi]: the error bound stays scale/2
        s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
        s = s16.float()
        zero = torch.round(-lo / s).clamp_(0, qmax)
        q = torch.round(wg / s[..., None] + zero[..., None]).clamp_(0, qmax).to(torch.uint8)
        return {"qweight": pack_nibbles(q.flatten(1)), "scale": s16, "zero": zero.to(torch.uint8)}

    def unit_codes(self, t: dict[str, torch.Tensor], out: int) -> torch.Tensor:
        codes = decode_nibbles("uint", _LEVELS, t["qweight"]).view(out, t["zero"].shape[1], -1)
        return codes.sub_(t["zero"].float()[..., None])

    def group_scale(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["scale"].float()


class Int4Format(UIntFormat):
    name = "int4"
    bits = 4


class Int3Format(UIntFormat):
    name = "int3"
    bits = 3


_LEVELS = torch.arange(16, dtype=torch.float32)
INT4 = register(Int4Format())
INT3 = register(Int3Format())


class Int4Weights(WeightQuantTechnique):
    name = "int4"
    format = INT4
