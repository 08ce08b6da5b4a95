"""int4 (and int3) group-wise weight-only quantization: asymmetric min/max per group of input columns, codes
packed two per byte.

Dettmers & Zettlemoyer 2023, "The case for 4-bit precision: k-bit Inference Scaling Laws" (small block sizes make
4-bit the bit-optimal choice); the group-wise asymmetric grid (scale + zero point) is the one GPTQ (Frantar et al.
2023) and AWQ (Lin et al. 2024) store. Bound: |W − Ŵ| ≤ s/2 per group. Per group an fp16 scale (rounded up, so
that 2^bits − 1 steps still cover [min, max]) and a uint8 zero point: 0.5 + 3/group_size bytes per parameter.
int3 uses a 3-bit grid in the same nibbles (AWQ and PEQA offer it; not bit-packed, so the same bytes).

Inference (no gradient) on CPU runs torch's int4 weight-only kernel (`_weight_int4pack_mm_for_cpu`, the CPU twin
of gpt-fast's tinygemm, which torchao's int4 CPU layout also calls) on the stored codes themselves: when
out_features is a multiple of 64, the codes are stored in the byte order that kernel reads (`BLOCK_N`), so it
needs no second copy of the weight. The kernel computes (q − 8)·s + m with bf16 activations, scales and offsets;
memfit passes s and m = (8 − zero)·s rounded to bf16 (built per call: 4 bytes per group, not stored), which adds
about 2⁻⁸ relative error per output on top of the weights' own — as int8's kernel path does. Other shapes, group
sizes the kernel lacks (32/64/128/256 only), gradients, and a torch without the kernel (or whose result disagrees
with the decoded weight on a probe: one warning) decode the weight instead.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from memfit.weights.base import WeightQuantTechnique
from memfit.weights.format import GroupwiseFormat, TensorSpecs, decode_nibbles, pack_nibbles, register, unpack_nibbles

BLOCK_N = 64
"""The stored byte order when out_features is a multiple of 64 (layout 2): per block of 64 output rows, for each
input column k, 32 bytes whose byte d holds row d (low nibble) and row d + 32 (high nibble) — the order torch's
`_convert_weight_to_int4pack_for_cpu` produces (tested), so its kernel reads the stored codes directly. Other
shapes keep row-major order, two consecutive columns per byte (layout 1, also what memfit wrote before)."""
KERNEL_GROUPS = (32, 64, 128, 256)
"""Group sizes `_weight_int4pack_mm_for_cpu` accepts."""


def blocked(out: int) -> bool:
    return out % BLOCK_N == 0


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """(out, K) uint8 codes in [0, 16) -> (out, K/2) stored bytes (blocked order when `blocked(out)`)."""
    out, k = q.shape
    if not blocked(out):
        return pack_nibbles(q)
    c = q.to(torch.uint8).view(out // BLOCK_N, 2, BLOCK_N // 2, k).permute(0, 3, 2, 1)  # (B, K, 32, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous().view(out, k // 2)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_codes`: (out, K/2) stored bytes -> (out, K) uint8 codes."""
    out, half = packed.shape
    if not blocked(out):
        return unpack_nibbles(packed)
    b = packed.view(out // BLOCK_N, 2 * half, BLOCK_N // 2)  # (B, K, 32)
    return torch.stack((b & 0xF, b >> 4), 1).permute(0, 1, 3, 2).reshape(out, 2 * half)


class UIntFormat(GroupwiseFormat):
    """Unsigned `bits`-bit codes with a per-group fp16 scale and uint8 zero point (zero is in every range)."""

    default_group = 64
    codes_per_byte = 2
    scale_name = "scale"
    layout_version = 2  # blocked byte order (`BLOCK_N`); checkpoints of layout 1 are repacked on load

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
        return {"qweight": pack_codes(q.flatten(1)), "scale": s16, "zero": zero.to(torch.uint8)}

    def unit_codes(self, t: dict[str, torch.Tensor], out: int) -> torch.Tensor:
        n_groups = t["zero"].shape[1]
        values = decode_nibbles("uint", _LEVELS, t["qweight"])  # (bytes, 2) in stored order
        zero = t["zero"].float()
        if not blocked(out):
            return values.view(out, n_groups, -1).sub_(zero[..., None])
        nb, half = out // BLOCK_N, BLOCK_N // 2
        # (B, K, 32, 2) stored -> (B, 2, 32, K) logical, un-permuted by the subtraction's output (no extra pass)
        logical = values.view(nb, -1, half, 2).permute(0, 3, 2, 1).unflatten(-1, (n_groups, -1))
        codes = torch.empty(out, n_groups, logical.shape[-1])
        torch.sub(logical, zero.view(nb, 2, half, n_groups, 1), out=codes.view(logical.shape))
        return codes

    def decode_rows(self, t: dict[str, torch.Tensor], rows: torch.Tensor, out: int, inp: int) -> torch.Tensor:
        if not blocked(out):
            return super().decode_rows(t, rows, out, inp)
        half = BLOCK_N // 2
        stored = t["qweight"].view(out // BLOCK_N, -1, half)  # (B, K, 32)
        shift = (rows % BLOCK_N // half * 4).to(torch.uint8)[:, None]
        codes = (stored[rows // BLOCK_N, :, rows % half] >> shift) & 0xF  # (n, K)
        n, n_groups = rows.numel(), t["zero"].shape[1]
        w = codes.float().view(n, n_groups, -1).sub_(t["zero"].index_select(0, rows).float()[..., None])
        w = w.mul_(self.group_scale(t).index_select(0, rows)[..., None]).view(n, -1)
        return w if w.shape[1] == inp else w[:, :inp]

    def upgrade_layout(self, t: dict[str, torch.Tensor], out: int, version: int) -> dict[str, torch.Tensor]:
        if version < 2 and blocked(out):
            return {**t, "qweight": pack_codes(unpack_nibbles(t["qweight"]))}
        return t

    def fused_linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor | None:
        w = t["qweight"]
        padded = w.shape[1] * 2
        group = padded // t["zero"].shape[1]
        if (x.device.type != "cpu" or not blocked(out) or group not in KERNEL_GROUPS or not w.is_contiguous()
                or w.data_ptr() % 64
                or not int4_kernel_works()):
            return None
        x2 = x.reshape(-1, inp).to(torch.bfloat16)
        if padded != inp:
            x2 = F.pad(x2, (0, padded - inp))
        y = int4_mm(x2.contiguous(), w, group, kernel_scales(t))
        return y.view(*x.shape[:-1], out).to(x.dtype)


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


def int4_mm(x: torch.Tensor, w: torch.Tensor, group: int, scales: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 weight-only matmul: x (M, K) bf16 · dequant(w)ᵀ -> (M, out) bf16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, scales)


def kernel_scales(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The kernel's (n_groups, out, 2) bf16 [scale, offset] with offset = (8 − zero)·scale: (q − 8)·s + offset
    = (q − zero)·s."""
    s = t["scale"].float()
    return torch.stack((s, (8 - t["zero"].float()) * s), -1).transpose(0, 1).to(torch.bfloat16).contiguous()


_KERNEL: dict[str, bool] = {}


def int4_kernel_works() -> bool:
    """Whether torch's CPU int4 kernel exists and agrees with the decoded weight on a probe (once per process);
    otherwise warn once, naming the torch version, and decode instead."""
    if "ok" not in _KERNEL:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(BLOCK_N, 128, generator=gen)
        x = torch.randn(3, 128, generator=gen).bfloat16().float()
        t = INT4.encode(w, 64)
        try:
            y = int4_mm(x.bfloat16(), t["qweight"], 64, kernel_scales(t)).float()
            ref = x @ INT4.decode(t, BLOCK_N, 128).t()
            ok = bool((y - ref).abs().max() <= 2**-6 * ref.abs().max())
        except (AttributeError, RuntimeError, NotImplementedError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = "its result disagrees with the decoded weight"
        if not ok:
            logging.getLogger("memfit").warning(
                "int4 weights: torch %s's int4 matmul kernel (_weight_int4pack_mm_for_cpu) is unusable (%s); "
                "decoding the weights per forward instead (slower)", torch.__version__, why)
        _KERNEL["ok"] = ok
    return _KERNEL["ok"]


class Int4Weights(WeightQuantTechnique):
    name = "int4"
    format = INT4
