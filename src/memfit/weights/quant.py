"""Shared math of weight-only quantization: group-wise codes, packing, `QuantLinear`, `quantize_model`.

Every format quantizes a linear weight `W (out, in)` in groups of `group_size` consecutive input columns per
output row (rows are zero-padded to a whole number of groups) and keeps real compact storage:

| format | codes                       | per-group constants                                   | bytes / param (g=64) |
|--------|-----------------------------|-------------------------------------------------------|----------------------|
| int8   | int8, symmetric absmax      | fp32 scale                                            | 1 + 4/g              |
| int4   | packed uint4 (2 per byte)   | fp16 scale (rounded up) + uint8 zero point, min/max   | 0.5 + 3/g  = 0.547   |
| nf4    | packed NF4 (QLoRA code book) | absmax double-quantized: int8 per group, fp32 per 256 groups, fp32 mean | 0.5 + 1/g + 4/(256g) = 0.516 |

All tensors are `nn.Parameter(requires_grad=False)` (PEQA makes the scale trainable), so memory trackers count
them as parameters and `state_dict` / safetensors carry them. `QuantLinear.forward` dequantizes on the fly inside
a custom autograd function that saves only the packed weight (not the dequantized copy), so LoRA on top trains
without keeping full-precision weights alive for backward — the point of QLoRA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import ConfigError

Format = Literal["int8", "int4", "int3", "nf4"]
FORMATS: tuple[str, ...] = ("int8", "int4", "int3", "nf4")
DEFAULT_GROUP = {"int8": 0, "int4": 64, "int3": 64, "nf4": 64}
"""Default group sizes; 0 means one group per output row (per-channel)."""

DQ_BLOCK = 256
"""NF4 double quantization: absmax constants are quantized in blocks of 256 (QLoRA §3)."""

# The NF4 code book of QLoRA (Dettmers et al. 2023, Appendix E): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero and 8 positive / 7 negative levels.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236328, 1.0,
])
NF4_MAX_HALF_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2)


def bits_of(fmt: str) -> int:
    return {"int8": 8, "int4": 4, "int3": 3, "nf4": 4}[fmt]


def effective_group(fmt: str, in_features: int, group_size: int | None) -> int:
    g = DEFAULT_GROUP[fmt] if group_size is None else group_size
    if g < 0:
        raise ConfigError(f"group_size must be ≥ 0 (0 = one group per row), got {g}")
    if g == 0 or g >= in_features:
        g = in_features
    if fmt != "int8" and g % 2:
        raise ConfigError(f"{fmt} packs two codes per byte: group_size must be even, got {g}")
    return g


# --- packing -------------------------------------------------------------------------------------------------

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(…, 2k) uint8 codes in [0, 16) -> (…, k) uint8, low nibble first."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (…, k) uint8 -> (…, 2k) uint8."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups, g), zero-padding the input dimension."""
    out, inp = w.shape
    pad = (-inp) % g
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(out, -1, g)


# --- per-format quantize / dequantize (on grouped float32 tensors) ------------------------------------------

def quantize_int8(wg: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = (wg.abs().amax(-1) / 127).clamp_min(1e-12)
    q = torch.round(wg / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return {"qweight": q.flatten(1), "scale": scale}


def quantize_uint(wg: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Asymmetric min/max quantization to `bits` (3 or 4) per group; zero included in the range."""
    qmax = 2 ** bits - 1
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


def quantize_nf4(wg: torch.Tensor) -> dict[str, torch.Tensor]:
    """NF4 with double-quantized absmax (QLoRA): codes, int8 absmax, fp32 second-level scale and mean."""
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


def nf4_absmax(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_mean: torch.Tensor) -> torch.Tensor:
    """Dequantize the double-quantized NF4 absmax constants -> (out, n_groups) float32."""
    flat = absmax_q.flatten().float()
    pad = (-flat.numel()) % DQ_BLOCK
    blocks = F.pad(flat, (0, pad)).reshape(-1, DQ_BLOCK) * absmax_scale[:, None]
    return (blocks.flatten()[: flat.numel()] + absmax_mean).reshape(absmax_q.shape)


def quantize_tensor(w: torch.Tensor, fmt: str, group_size: int) -> dict[str, torch.Tensor]:
    """Quantize a 2-D weight with groups of `group_size` input columns (`effective_group` first)."""
    wg = _grouped(w.detach().float(), group_size)
    if fmt == "int8":
        return quantize_int8(wg)
    if fmt in ("int4", "int3"):
        return quantize_uint(wg, bits_of(fmt))
    if fmt == "nf4":
        return quantize_nf4(wg)
    raise ConfigError(f"unknown weight format '{fmt}'; choose one of: {', '.join(FORMATS)}")


def _byte_lut(values: torch.Tensor) -> torch.Tensor:
    """(256, 2) table: the two decoded values of every packed byte (low nibble first)."""
    b = torch.arange(256)
    return torch.stack((values[b & 0xF], values[b >> 4]), -1)


_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _lut(fmt: str, device: torch.device) -> torch.Tensor:
    key = (fmt, device)
    if key not in _LUTS:
        values = NF4_CODE if fmt == "nf4" else torch.arange(16, dtype=torch.float32)
        _LUTS[key] = _byte_lut(values).to(device)
    return _LUTS[key]


def unit_codes(fmt: str, t: dict[str, torch.Tensor], out: int, padded_in: int) -> torch.Tensor:
    """The weight divided by its per-group scale, as (out, n_groups, g) float32 (the part PEQA keeps frozen)."""
    q = t["qweight"]
    if fmt == "int8":
        return q.float().reshape(out, t["scale"].shape[1], -1)
    # one table lookup per byte decodes both nibbles (2x faster than unpack + lookup on CPU)
    codes = _lut(fmt, q.device).index_select(0, q.flatten().int())
    if fmt == "nf4":
        return codes.view(out, t["absmax_q"].shape[1], -1)
    codes = codes.view(out, t["zero"].shape[1], -1)
    return codes.sub_(t["zero"].float()[..., None])


def group_scale(fmt: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if fmt == "nf4":
        return nf4_absmax(t["absmax_q"], t["absmax_scale"], t["absmax_mean"])
    return t["scale"].float()


def dequantize_tensor(fmt: str, t: dict[str, torch.Tensor], shape: tuple[int, int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out, inp = shape
    padded = _padded(t, fmt)
    w = unit_codes(fmt, t, out, padded).mul_(group_scale(fmt, t)[..., None]).view(out, padded)
    return (w if padded == inp else w[:, :inp]).to(dtype)


def _padded(t: dict[str, torch.Tensor], fmt: str) -> int:
    """The padded input width the stored codes cover."""
    q = t["qweight"]
    return q.shape[1] if fmt == "int8" else q.shape[1] * 2


def error_bound(fmt: str, t: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Per-element bound on |W - dequant(quant(W))| derived from the stored constants.

    int8: round-to-nearest on a grid of step s -> s/2. int4/int3: zero is rounded, but the range includes 0 and
    the fp16 scale is rounded up, so qmax steps still cover [min, max]: every value is within s/2 of the grid.
    NF4: |v·a − c(v)·â| ≤ a·(max code gap)/2 + |a − â|, with |a − â| ≤ s₂/2 from the int8 double quantization.
    """
    _, inp = shape
    if fmt == "nf4":
        a_hat = group_scale(fmt, t)
        s2 = t["absmax_scale"].repeat_interleave(DQ_BLOCK)[: a_hat.numel()].reshape(a_hat.shape)
        a_max = a_hat + s2 / 2
        per_group = a_max * NF4_MAX_HALF_GAP + s2 / 2
    else:
        per_group = group_scale(fmt, t) / 2
    g = _padded(t, fmt) // per_group.shape[1]
    return per_group.repeat_interleave(g, dim=1)[:, :inp] * (1 + 1e-5) + 1e-7


def storage_bytes(fmt: str, out: int, inp: int, group_size: int, has_in_scale: bool = False) -> int:
    """Exact bytes `QuantLinear` stores for an (out, in) weight (bias excluded); the estimate of record."""
    g = effective_group(fmt, inp, group_size)
    n_groups = math.ceil(inp / g)
    padded = n_groups * g
    extra = 4 * inp if has_in_scale else 0
    if fmt == "int8":
        return out * padded + 4 * out * n_groups + extra
    if fmt in ("int4", "int3"):
        return out * padded // 2 + 3 * out * n_groups + extra
    n_abs = out * n_groups
    return out * padded // 2 + n_abs + 4 * math.ceil(n_abs / DQ_BLOCK) + 4 + extra


# --- the module ----------------------------------------------------------------------------------------------

class _DequantLinear(torch.autograd.Function):
    """y = x·dequant(W)ᵀ + b that saves the packed weight, not the dequantized one, for backward.

    The gradient w.r.t. a trainable per-group scale (PEQA) is Σ_group (∂L/∂W ⊙ codes).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # type: ignore[override]
        w = layer.dequantize(x.dtype)
        ctx.layer = layer
        ctx.scale_grad = scale.requires_grad
        ctx.save_for_backward(x if scale.requires_grad else None)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        layer: QuantLinear = ctx.layer
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ layer.dequantize(grad_out.dtype)
        if ctx.scale_grad:
            (x,) = ctx.saved_tensors
            gw = grad_out.reshape(-1, grad_out.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()
            gw = F.pad(gw, (0, layer.padded_in - layer.in_features))
            codes = unit_codes(layer.fmt, layer.tensors(), layer.out_features, layer.padded_in)
            grad_scale = (gw.reshape_as(codes) * codes).sum(-1).to(layer.scale_param().dtype)
        return grad_x, grad_scale, None


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized (int8 / int4 / int3 / NF4) and dequantized per forward.

    `in_scale` (optional, AWQ): per-input-channel factors s; the stored weight is quant(W·diag(s)) and the input
    is divided by s, which is the same product with the salient channels quantized more finely.
    """

    memfit_quantized_weight = True  # techniques.base.QUANTIZED_WEIGHT_MARK: adapters refuse to wrap it

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int | None = None,
                 bias: bool = False, in_scale: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ConfigError(f"unknown weight format '{fmt}'; choose one of: {', '.join(FORMATS)}")
        self.fmt = fmt
        self.in_features = self.infeatures = in_features
        self.out_features = self.outfeatures = out_features
        self.group_size = effective_group(fmt, in_features, group_size)
        n_groups = math.ceil(in_features / self.group_size)
        self.padded_in = n_groups * self.group_size
        shapes = _tensor_shapes(fmt, out_features, self.padded_in, n_groups)
        for name, (shape, dtype) in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device),
                                                       requires_grad=False))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.in_scale = (nn.Parameter(torch.ones(in_features, device=device), requires_grad=False)
                         if in_scale else None)
        self.compute_dtype = torch.float32

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int | None = None,
                    in_scale: torch.Tensor | None = None) -> QuantLinear:
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, fmt, group_size, bias=linear.bias is not None,
                in_scale=in_scale is not None, device=w.device)
        if in_scale is not None:
            q.in_scale.data.copy_(in_scale.float())
            w = w * in_scale.float()[None, :]
        q.load_tensors(quantize_tensor(w, fmt, q.group_size))
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach().float())
        q.compute_dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.float32
        return q

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in _TENSOR_NAMES[self.fmt]}

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        for name, value in t.items():
            param = getattr(self, name)
            # clone: a slice of a padded buffer would keep the whole padded storage alive
            param.data = value.to(device=param.device, dtype=param.dtype).reshape(param.shape).clone()

    def scale_param(self) -> torch.Tensor | None:
        """The per-group float scale (int8/int4/int3), the tensor PEQA trains; None for NF4."""
        return None if self.fmt == "nf4" else self._parameters["scale"]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor, for inspection and merging)."""
        return self.dequantize(self.compute_dtype)

    def make_scale_trainable(self) -> nn.Parameter:
        """PEQA: turn the per-group scale into a trainable fp32 parameter (codes and zero points stay frozen)."""
        if self.fmt == "nf4":
            raise ConfigError("NF4 scales are double-quantized int8 constants; PEQA needs int3/int4/int8")
        scale = nn.Parameter(self._parameters["scale"].detach().float(), requires_grad=True)
        self._parameters["scale"] = scale
        return scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = dequantize_tensor(self.fmt, self.tensors(), (self.out_features, self.in_features), torch.float32)
        if self.in_scale is not None:
            w = w / self.in_scale[None, :]
        return w.to(dtype)

    def quantized_bytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.tensors().values())
        return n + (self.in_scale.numel() * 4 if self.in_scale is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else self.compute_dtype
        scale = self.scale_param()
        if scale is None:
            scale = torch.empty(0, device=x.device)
        y = _DequantLinear.apply(x.to(dtype), scale, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"group_size={self.group_size}, awq={self.in_scale is not None}")


_TENSOR_NAMES = {
    "int8": ("qweight", "scale"),
    "int4": ("qweight", "scale", "zero"),
    "int3": ("qweight", "scale", "zero"),
    "nf4": ("qweight", "absmax_q", "absmax_scale", "absmax_mean"),
}


def _tensor_shapes(fmt: str, out: int, padded_in: int, n_groups: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if fmt == "int8":
        return {"qweight": ((out, padded_in), torch.int8), "scale": ((out, n_groups), torch.float32)}
    if fmt in ("int4", "int3"):
        return {"qweight": ((out, padded_in // 2), torch.uint8), "scale": ((out, n_groups), torch.float16),
                "zero": ((out, n_groups), torch.uint8)}
    return {"qweight": ((out, padded_in // 2), torch.uint8), "absmax_q": ((out, n_groups), torch.int8),
            "absmax_scale": ((math.ceil(out * n_groups / DQ_BLOCK),), torch.float32),
            "absmax_mean": ((1,), torch.float32)}


# --- whole models ---------------------------------------------------------------------------------------------

DEFAULT_SKIP = ("lm_head",)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) or name.split(".")[-1] == p or p in name.split(".")
               for p in patterns)


def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP,
                        target: Iterable[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` modules `quantize_model` would replace (targets: module names or name suffixes)."""
    skip = tuple(skip)
    found = []
    for name, mod in model.named_modules():
        if not name or _matches(name, skip):
            continue
        if target is not None and not _matches(name, target):
            continue
        if isinstance(mod, nn.Linear):
            found.append((name, mod))
        elif (target is not None and _matches(name, target) and not isinstance(mod, QuantLinear)
              and (next(mod.children(), None) is None or any(True for _ in mod.parameters(recurse=False)))):
            raise ConfigError(f"cannot quantize '{name}' ({type(mod).__name__}): weight-only quantization "
                                  "applies to nn.Linear layers; remove it from the targets")
    return found


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, fmt: str, group_size: int | None = None,
                   skip: Iterable[str] = DEFAULT_SKIP, target: Iterable[str] | None = None,
                   in_scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace every `nn.Linear` (except `skip`, optionally only `target`) with a `QuantLinear`, in place.

    Targeting a module that is not a linear layer raises `ConfigError`.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown weight format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    linears = quantizable_linears(model, skip, target)
    if not linears:
        raise ConfigError("no nn.Linear layer to quantize: check 'skip' / 'target'")
    for name, lin in linears:
        scale = in_scales.get(name) if in_scales else None
        set_submodule(model, name, QuantLinear.from_linear(lin, fmt, group_size, in_scale=scale))
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of the model (packed tensors at their real size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
