"""int4 (and int3) group-wise weight-only quantization: asymmetric min/max per group of input columns, codes
packed two per byte.

Dettmers & Zettlemoyer 2023, "The case for 4-bit precision: k-bit Inference Scaling Laws" (small block sizes make
4-bit the bit-optimal choice); the group-wise asymmetric grid (scale + zero point) is the one GPTQ (Frantar et al.
2023) and AWQ (Lin et al. 2024) store. Bound: |W − Ŵ| ≤ s/2 per group. Per group an fp16 scale (rounded up, so
that 2^bits − 1 steps still cover [min, max]) and a uint8 zero point: 0.5 + 3/group_size bytes per parameter.
int3 uses a 3-bit grid in the same nibbles (AWQ and PEQA offer it; not bit-packed, so the same bytes).

Inference (no gradient) on CPU runs torch's int4 weight-only kernel (`_weight_int4pack_mm_for_cpu`, the CPU twin
of gpt-fast's tinygemm, which torchao's int4 CPU layout also calls) on the stored codes themselves: when
out_features is a multiple of 16, the codes are stored in the byte order that kernel reads (`BLOCK_N`), so it
needs no second copy of the weight. The kernel computes (q − 8)·s + m with bf16 activations, scales and offsets;
memfit passes s and m = (8 − zero)·s rounded to bf16, built per call (4 bytes per group; keeping them measured
+21 % tokens/s on a small model but would cost bytes beyond torchao's 0.5 + 4/g per parameter), which adds
about 2⁻⁸ relative error per output on top of the weights' own — as int8's kernel path does. Other shapes, group
sizes the kernel lacks (32/64/128/256 only), gradients, and a torch without the kernel (or whose result disagrees
with the decoded weight on a probe: one warning) decode the weight instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memfit.weights.base import WeightQuantTechnique
from memfit.weights.kernels import kernel_works
from memfit.weights.format import GroupwiseFormat, TensorSpecs, decode_nibbles, pack_nibbles, register, unpack_nibbles

BLOCK_N = 64
"""The stored byte order when out_features is a multiple of 16 (layout 2) is the one torch's
`_convert_weight_to_int4pack_for_cpu` produces (tested), so its kernel reads the stored codes directly: per block
of 64 output rows, for each input column k, 32 bytes whose byte d holds row d (low nibble) and row d + 32 (high
nibble); the last out % 64 rows follow, for each k, as consecutive rows two per byte. Other shapes keep
row-major order, two consecutive columns per byte (layout 1, also what memfit wrote before)."""
KERNEL_GROUPS = (32, 64, 128, 256)
"""Group sizes `_weight_int4pack_mm_for_cpu` accepts."""


def blocked(out: int) -> bool:
    return out % 16 == 0


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """(out, K) uint8 codes in [0, 16) -> (out, K/2) stored bytes (the kernel's order when `blocked(out)`)."""
    out, k = q.shape
    q = q.to(torch.uint8)
    if not blocked(out):
        return pack_nibbles(q)
    main = out - out % BLOCK_N
    c = q[:main].reshape(main // BLOCK_N, 2, BLOCK_N // 2, k).permute(0, 3, 2, 1)  # (B, K, 32, 2)
    tail = q[main:].t().reshape(-1, 2)  # (K · tail rows / 2, 2): for each k, consecutive rows
    return torch.cat(((c[..., 0] | (c[..., 1] << 4)).flatten(), tail[:, 0] | (tail[:, 1] << 4))).view(out, k // 2)


def _logical(nibbles: torch.Tensor, out: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code values in stored order (flat, `blocked(out)`) as strided views of the logical weight: the 64-row
    blocks as (B, 2, 32, K) — row b·64 + h·32 + d — and the tail rows as (out % 64, K)."""
    main = out - out % BLOCK_N
    head = nibbles[: main * k].view(main // BLOCK_N, k, BLOCK_N // 2, 2).permute(0, 3, 2, 1)
    return head, nibbles[main * k:].view(k, out - main).t()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_codes`: (out, K/2) stored bytes -> (out, K) uint8 codes."""
    nib = torch.stack((packed & 0xF, packed >> 4), -1)
    out, k = packed.shape[0], packed.shape[1] * 2
    if not blocked(out):
        return nib.view(out, k)
    head, tail = _logical(nib.flatten(), out, k)
    codes = torch.empty(out, k, dtype=torch.uint8)
    main = out - tail.shape[0]
    codes[:main].view(head.shape).copy_(head)
    codes[main:].copy_(tail)
    return codes


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
        # stored order -> logical rows, un-permuted by the subtraction's output (no extra pass)
        head, tail = _logical(values.flatten(), out, values.numel() // out)
        codes = torch.empty(out, n_groups, values.numel() // out // n_groups)
        main = out - tail.shape[0]
        head = head.unflatten(-1, (n_groups, -1))
        torch.sub(head, zero[:main].view(*head.shape[:-1], 1), out=codes[:main].view(head.shape))
        torch.sub(tail.unflatten(-1, (n_groups, -1)), zero[main:, :, None], out=codes[main:])
        return codes

    def decode_rows(self, t: dict[str, torch.Tensor], rows: torch.Tensor, out: int, inp: int) -> torch.Tensor:
        if not blocked(out):
            return super().decode_rows(t, rows, out, inp)
        k, main = t["qweight"].shape[1] * 2, out - out % BLOCK_N
        r, col = rows[:, None], torch.arange(k)[None, :]
        nibble = torch.where(r < main, r // BLOCK_N * BLOCK_N * k + col * BLOCK_N + r % 32 * 2 + r % BLOCK_N // 32,
                             main * k + col * (out - main) + (r - main))  # (n, K): where each code is stored
        stored = t["qweight"].flatten()[nibble // 2]
        codes = (stored >> (nibble % 2 * 4).to(torch.uint8)) & 0xF
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
    """Whether torch's CPU int4 kernel exists and agrees with the decoded weight on a probe (`kernel_works`)."""

    def agrees() -> bool:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(BLOCK_N, 128, generator=gen)
        x = torch.randn(3, 128, generator=gen).bfloat16().float()
        t = INT4.encode(w, 64)
        y = int4_mm(x.bfloat16(), t["qweight"], 64, kernel_scales(t)).float()
        ref = x @ INT4.decode(t, BLOCK_N, 128).t()
        return bool((y - ref).abs().max() <= 2**-6 * ref.abs().max())

    return kernel_works(_KERNEL, "int4", "_weight_int4pack_mm_for_cpu", agrees)


class Int4Weights(WeightQuantTechnique):
    name = "int4"
    format = INT4
