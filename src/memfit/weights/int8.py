"""int8 weight-only quantization: symmetric absmax per output channel (or per group).

Dettmers, Lewis, Belkada & Zettlemoyer 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(vector-wise absmax quantization; memfit keeps the weights in int8 and dequantizes per forward, without the
outlier decomposition). Bound: |W − Ŵ| ≤ s/2 with s = absmax/127 per group. ≈1 byte per parameter:
int8 codes + one fp32 scale per group (1 + 4/g bytes per parameter; per channel by default).
"""

from __future__ import annotations

import torch

from memfit.weights.base import WeightQuantTechnique
from memfit.weights.format import GroupwiseFormat, TensorSpecs, register


class Int8Format(GroupwiseFormat):
    name = "int8"
    bits = 8
    default_group = 0  # one group per output row
    scale_name = "scale"

    def tensor_specs(self, out: int, padded_in: int, n_groups: int) -> TensorSpecs:
        return {"qweight": ((out, padded_in), torch.int8), "scale": ((out, n_groups), torch.float32)}

    def quantize_groups(self, wg: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = (wg.abs().amax(-1) / 127).clamp_min(1e-12)
        q = torch.round(wg / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return {"qweight": q.flatten(1), "scale": scale}

    def unit_codes(self, t: dict[str, torch.Tensor], out: int) -> torch.Tensor:
        return t["qweight"].float().reshape(out, t["scale"].shape[1], -1)

    def group_scale(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["scale"].float()


INT8 = register(Int8Format())


class Int8Weights(WeightQuantTechnique):
    name = "int8"
    format = INT8
