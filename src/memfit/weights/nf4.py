"""NF4 weights with double-quantized constants, as the frozen base of QLoRA.

Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs": 4-bit NormalFloat
(quantiles of N(0,1), block-wise absmax, block 64) and Double Quantization of the absmax constants (block 256).
The code book and block layout match bitsandbytes' `quantize_4bit(quant_type="nf4")` code for code (tested); the
second-level constants are int8 absmax per 256 blocks after subtracting their mean (the paper uses FP8; same
bytes). 0.5 + 1/64 + 4/(64·256) ≈ 0.516 bytes per parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memfit.weights.base import WeightQuantTechnique
from memfit.weights.format import GroupwiseFormat, TensorSpecs, decode_nibbles, pack_nibbles, register

DQ_BLOCK = 256
"""Double quantization: absmax constants are quantized in blocks of 256 (QLoRA §3)."""

# The NF4 code book of QLoRA (Appendix E): quantiles of N(0, 1) normalised to [-1, 1], with an exact zero and
# 8 positive / 7 negative levels.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236328, 1.0,
])
NF4_MAX_HALF_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2)


class NF4Format(GroupwiseFormat):
    """NF4 codes (two per byte) scaled by a per-group absmax that is itself stored as int8 per 256 groups with
    an fp32 scale per block and one fp32 mean."""

    name = "nf4"
    bits = 4
    default_group = 64
    codes_per_byte = 2
    untrainable_scale = "NF4 scales are double-quantized int8 constants; PEQA needs int3/int4/int8"

    def tensor_specs(self, out: int, padded_in: int, n_groups: int) -> TensorSpecs:
        return {"qweight": ((out, padded_in // 2), torch.uint8), "absmax_q": ((out, n_groups), torch.int8),
                "absmax_scale": ((math.ceil(out * n_groups / DQ_BLOCK),), torch.float32),
                "absmax_mean": ((1,), torch.float32)}

    def quantize_groups(self, wg: torch.Tensor) -> dict[str, torch.Tensor]:
        absmax = wg.abs().amax(-1)  # (out, n_groups)
        normed = wg / absmax.clamp_min(1e-12)[..., None]
        mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
        codes = torch.bucketize(normed, mids.to(normed.dtype))
        flat = absmax.flatten()
        mean = flat.mean()
        centred = flat - mean
        pad = (-centred.numel()) % DQ_BLOCK
        blocks = F.pad(centred, (0, pad)).reshape(-1, DQ_BLOCK)
        aq_scale = (blocks.abs().amax(-1) / 127).clamp_min(1e-12)
        aq = torch.round(blocks / aq_scale[:, None]).clamp_(-127, 127).to(torch.int8).flatten()[: flat.numel()]
        return {"qweight": pack_nibbles(codes.flatten(1)), "absmax_q": aq.reshape(absmax.shape),
                "absmax_scale": aq_scale, "absmax_mean": mean.reshape(1)}

    def unit_codes(self, t: dict[str, torch.Tensor], out: int) -> torch.Tensor:
        return decode_nibbles(self.name, NF4_CODE, t["qweight"]).view(out, t["absmax_q"].shape[1], -1)

    def group_scale(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The double-quantized absmax constants, dequantized -> (out, n_groups) float32."""
        flat = t["absmax_q"].flatten().float()
        pad = (-flat.numel()) % DQ_BLOCK
        blocks = F.pad(flat, (0, pad)).reshape(-1, DQ_BLOCK) * t["absmax_scale"][:, None]
        return (blocks.flatten()[: flat.numel()] + t["absmax_mean"]).reshape(t["absmax_q"].shape)

    def row_scale(self, t: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """`group_scale` of rows `rows` only: each constant's int8 code times its 256-block's scale, plus the mean."""
        n_groups = t["absmax_q"].shape[1]
        flat = rows[:, None] * n_groups + torch.arange(n_groups, device=rows.device)
        codes = t["absmax_q"].flatten()[flat].float()
        return codes * t["absmax_scale"][flat // DQ_BLOCK] + t["absmax_mean"]

    def group_error(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """|v·a − c(v)·â| ≤ a·(max code gap)/2 + |a − â|, with |a − â| ≤ s₂/2 from the int8 double
        quantization."""
        a_hat = self.group_scale(t)
        s2 = t["absmax_scale"].repeat_interleave(DQ_BLOCK)[: a_hat.numel()].reshape(a_hat.shape)
        return (a_hat + s2 / 2) * NF4_MAX_HALF_GAP + s2 / 2


NF4 = register(NF4Format())


class NF4Weights(WeightQuantTechnique):
    name = "nf4"
    format = NF4
