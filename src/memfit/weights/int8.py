"""int8 weight-only quantization: symmetric absmax per output channel (or per group).

Dettmers, Lewis, Belkada & Zettlemoyer 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(vector-wise absmax quantization; memfit keeps the weights in int8 and dequantizes per forward, without the
outlier decomposition). Bound: |W − Ŵ| ≤ s/2 with s = absmax/127 per group. ≈1 byte per parameter:
int8 codes + one fp32 scale per group (1 + 4/g bytes per parameter; per channel by default).

Inference (no gradient) with per-channel scales runs torch's CPU int8 weight-only kernel
`torch._weight_int8pack_mm` on the codes, then multiplies by the fp32 scales: the activations enter the kernel
in bf16 (its fp32 path is several times slower than a dense fp32 matmul; the bf16 one is faster), which adds
a relative error of about 2⁻⁸ per output on top of the weights' — the same order as the int8 weights' own and
finer than llama.cpp's Q8_0, which rounds activations to 8 bits. The kernel reads out of bounds when the input
width is not a multiple of 16 or an operand is not 64-byte aligned (torch 2.13, checked), so such layers decode
instead (`load_quantized` copies the stored tensors out of the file buffer, aligned); a torch without the kernel,
or one whose result disagrees with the decoded weight on a probe, falls back to decoding with one warning.
"""

from __future__ import annotations


import torch

from memfit.weights.base import WeightQuantTechnique
from memfit.weights.kernels import kernel_works
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

    def fused_linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor | None:
        w = t["qweight"]
        if (x.device.type != "cpu" or t["scale"].shape[1] != 1 or inp % KERNEL_WIDTH or not aligned(w)
                or not int8_kernel_works()):
            return None
        x2 = x.reshape(-1, inp).to(torch.bfloat16)
        if not (x2.is_contiguous() and aligned(x2)):
            x2 = x2.clone(memory_format=torch.contiguous_format)
        y = torch._weight_int8pack_mm(x2, w, _ones(out))
        return (y.float() * t["scale"].view(1, out)).view(*x.shape[:-1], out).to(x.dtype)


KERNEL_WIDTH = 16
"""`_weight_int8pack_mm` is correct for input widths that are multiples of 16 (other widths: wrong or crash)."""
ALIGN = 64
"""...and for operands whose data starts 64-byte aligned (an int8 weight at an 8-byte offset, e.g. inside a
safetensors file buffer, crashes it with several input rows); torch's CPU allocator aligns to 64."""


def aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN == 0

_KERNEL: dict[str, bool] = {}
_ONES: dict[int, torch.Tensor] = {}


def _ones(n: int) -> torch.Tensor:
    """Unit bf16 scales for the kernel (the fp32 scales are applied after it, without bf16 rounding)."""
    if n not in _ONES:
        _ONES[n] = torch.ones(n, dtype=torch.bfloat16)
    return _ONES[n]


def int8_kernel_works() -> bool:
    """Whether torch's CPU int8 weight-only kernel exists and agrees with the decoded weight on a probe
    (`kernel_works`)."""

    def agrees() -> bool:
        gen = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (24, 48), dtype=torch.int8, generator=gen)
        x = torch.randn(3, 48, generator=gen)
        y = torch._weight_int8pack_mm(x.bfloat16(), w, torch.ones(24, dtype=torch.bfloat16)).float()
        return bool((y - x.bfloat16().float() @ w.float().t()).abs().max() <= 2**-7 * y.abs().max())

    return kernel_works(_KERNEL, "int8", "torch._weight_int8pack_mm", agrees)


INT8 = register(Int8Format())


class Int8Weights(WeightQuantTechnique):
    name = "int8"
    format = INT8
