"""A weight storage format is a type; the algorithm around it (`memfit.weights.linear`) is written once.

After torchao's design (its quantized tensor subclasses: one class per storage layout, one `quantize_` for all):
a `WeightFormat` says which tensors store an (out, in) weight, how to encode a dense weight into them, how to
decode them, how far the decoded weight may be from the original, and how many bytes that takes. `QuantLinear`,
`quantize_model`, the estimates (`weights.base.quantize_spec`), saving and loading only talk to this interface,
so a new format is one file: its class, its instance passed to `register`, and its `weights` technique.

`GroupwiseFormat` is the family memfit ships (int8, int4/int3, NF4): W ≈ codes · scale per group of `group_size`
consecutive input columns of one output row, rows zero-padded to a whole number of groups. A format outside it
(DFloat11's entropy-coded exponents, BitStack's residual sign blocks) subclasses `WeightFormat` directly and
implements `layout`, `encode`, `decode`, `error_bound` (and `storage_bytes` where it is data-dependent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from memfit.errors import ConfigError

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Stored tensor name -> (shape, dtype)."""


@dataclass(frozen=True)
class StorageLayout:
    """How one (out, in) weight is stored: the effective group size, the padded input width, the tensors."""

    group_size: int
    padded_in: int
    tensors: TensorSpecs


class WeightFormat:
    """One storage format of a linear weight. Subclasses set `name` and implement the methods below."""

    name: ClassVar[str]
    scale_name: ClassVar[str | None] = None
    """The stored per-group float scale a method may train (PEQA), or None."""
    untrainable_scale: ClassVar[str] = "this format has no per-group float scale to train"
    """Why `scale_name` is None, for the error a method that trains scales raises."""
    stacked: ClassVar[tuple[str, ...]] = ()
    """Stored tensors stacked along their first dimension by importance (BitStack): any prefix is a weight, so
    `load_quantized(dir, stack=k)` reads only the first k entries."""
    variable_size: ClassVar[bool] = False
    """True when the stored sizes depend on the weight's values (entropy coding): `layout` and `storage_bytes`
    then predict them, and the stored shapes travel with checkpoints."""
    layout_version: ClassVar[int] = 1
    """The stored byte order's version, written to checkpoints; `upgrade_layout` converts older ones on load."""

    def effective_group(self, in_features: int, group_size: int | None) -> int:
        """The group size used for a weight with `in_features` columns (`ConfigError` if the format refuses it)."""
        return in_features

    def layout(self, out: int, inp: int, group_size: int | None) -> StorageLayout:
        raise NotImplementedError

    def encode(self, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        """The stored tensors of the 2-D weight `w` (`group_size` from `effective_group`)."""
        raise NotImplementedError

    def decode(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        """The (out, inp) float32 weight the stored tensors represent."""
        raise NotImplementedError

    def error_bound(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        """Per-element bound on |W − decode(encode(W))|, derived from the stored tensors."""
        raise NotImplementedError

    def decode_rows(self, t: dict[str, torch.Tensor], rows: torch.Tensor, out: int, inp: int) -> torch.Tensor:
        """Rows `rows` (1-D int64) of the decoded weight, as (len(rows), inp) float32: what an embedding lookup
        reads. This default decodes the whole weight; a format that can decode single rows overrides it."""
        return self.decode(t, out, inp).index_select(0, rows)

    def upgrade_layout(self, t: dict[str, torch.Tensor], out: int, version: int) -> dict[str, torch.Tensor]:
        """The stored tensors of a checkpoint written with layout `version`, in this format's current layout."""
        return t

    def fused_linear(self, x: torch.Tensor, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor | None:
        """x·Wᵀ straight from the stored tensors with a kernel of torch's, for inference; None where the format
        has none for this input (then `QuantLinear` decodes W and calls `F.linear`)."""
        return None

    def storage_bytes(self, out: int, inp: int, group_size: int | None) -> int:
        """Exact bytes the stored tensors of an (out, in) weight take (the estimate of record)."""
        tensors = self.layout(out, inp, group_size).tensors.values()
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class GroupwiseFormat(WeightFormat):
    """W ≈ unit codes × per-group scale, per group of `group_size` input columns (0 = one group per row).

    Subclasses set `bits`, `default_group`, `codes_per_byte` and implement `tensor_specs`, `quantize_groups`,
    `unit_codes` and `group_scale`; grouping, padding, decoding and the default error bound (half a step) are
    written here once."""

    bits: ClassVar[int]
    default_group: ClassVar[int]
    codes_per_byte: ClassVar[int] = 1

    def effective_group(self, in_features: int, group_size: int | None) -> int:
        g = self.default_group if group_size is None else group_size
        if g < 0:
            raise ConfigError(f"group_size must be ≥ 0 (0 = one group per row), got {g}")
        if g == 0 or g >= in_features:
            g = in_features
        if self.codes_per_byte > 1 and g % self.codes_per_byte:
            raise ConfigError(f"{self.name} packs two codes per byte: group_size must be even, got {g}")
        return g

    def layout(self, out: int, inp: int, group_size: int | None) -> StorageLayout:
        g = self.effective_group(inp, group_size)
        n_groups = math.ceil(inp / g)
        return StorageLayout(g, n_groups * g, self.tensor_specs(out, n_groups * g, n_groups))

    # --- what a group-wise format states ---------------------------------------------------------------
    def tensor_specs(self, out: int, padded_in: int, n_groups: int) -> TensorSpecs:
        raise NotImplementedError

    def quantize_groups(self, wg: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored tensors of the grouped float32 weight `wg` (out, n_groups, g)."""
        raise NotImplementedError

    def unit_codes(self, t: dict[str, torch.Tensor], out: int) -> torch.Tensor:
        """The weight divided by its per-group scale, as (out, n_groups, g) float32 (what PEQA keeps frozen)."""
        raise NotImplementedError

    def scale_grad(self, grad_w: torch.Tensor, t: dict[str, torch.Tensor], out: int) -> torch.Tensor:
        """∂L/∂(the trainable `scale_name` tensor) from ∂L/∂W (out, padded in; fp32): per group Σ ∂L/∂W ⊙ the unit
        codes (PEQA's scales); a format whose trainable tensor enters W another way overrides it."""
        codes = self.unit_codes(t, out)
        return (grad_w.reshape_as(codes) * codes).sum(-1)

    def group_scale(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The per-group scale as (out, n_groups) float32."""
        raise NotImplementedError

    def group_error(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-group error bound: round-to-nearest on a grid of step s is within s/2."""
        return self.group_scale(t) / 2

    # --- written once ------------------------------------------------------------------------------------
    def padded_width(self, t: dict[str, torch.Tensor]) -> int:
        """The padded input width the stored codes cover."""
        return t["qweight"].shape[1] * self.codes_per_byte

    def encode(self, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        return self.quantize_groups(grouped(w.detach().float(), group_size))

    def decode(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        padded = self.padded_width(t)
        w = self.unit_codes(t, out).mul_(self.group_scale(t)[..., None]).view(out, padded)
        return w if padded == inp else w[:, :inp]

    def select_rows(self, t: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of the weight's rows `rows`: every tensor with one row per output row is gathered,
        the others (block constants) are passed through."""
        out = t["qweight"].shape[0]
        return {k: v.index_select(0, rows) if v.dim() == 2 and v.shape[0] == out else v for k, v in t.items()}

    def row_scale(self, t: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """The per-group scale of rows `rows` as (len(rows), n_groups) float32 (a format whose scales are stored
        in blocks across rows overrides it)."""
        return self.group_scale(self.select_rows(t, rows))

    def decode_rows(self, t: dict[str, torch.Tensor], rows: torch.Tensor, out: int, inp: int) -> torch.Tensor:
        n = rows.numel()
        w = self.unit_codes(self.select_rows(t, rows), n).mul_(self.row_scale(t, rows)[..., None]).view(n, -1)
        return w if w.shape[1] == inp else w[:, :inp]

    def error_bound(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        per_group = self.group_error(t)
        g = self.padded_width(t) // per_group.shape[1]
        return per_group.repeat_interleave(g, dim=1)[:, :inp] * (1 + 1e-5) + 1e-7


def grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups, g), zero-padding the input dimension."""
    out, inp = w.shape
    pad = (-inp) % g
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(out, -1, g)


# --- packing two 4-bit codes per byte ------------------------------------------------------------------------

def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(…, 2k) uint8 codes in [0, 16) -> (…, k) uint8, low nibble first."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (…, k) uint8 -> (…, 2k) uint8."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def decode_nibbles(name: str, values: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The code values of packed nibbles as (bytes, 2) float32, low nibble first: one lookup per byte in a table
    of its two decoded values, cached per format and device. The table's rows are 8 bytes, so it is kept as 256
    float64 words and gathered one-dimensionally, then reinterpreted as float32 pairs (bit-identical): torch's
    `index_select` of (256, 2) rows takes ~60x longer on CPU (3.8 ms vs 65 µs for 88 k bytes, torch 2.13)."""
    key = (name, packed.device)
    if key not in _LUTS:
        b = torch.arange(256)
        pairs = torch.stack((values[b & 0xF], values[b >> 4]), -1).float().contiguous()
        _LUTS[key] = pairs.view(torch.float64).view(256).to(packed.device)
    return _LUTS[key].index_select(0, packed.flatten().int()).view(torch.float32).view(-1, 2)


# --- the formats by name -------------------------------------------------------------------------------------

_REGISTRY: dict[str, WeightFormat] = {}


def register(fmt: WeightFormat) -> WeightFormat:
    """Make `fmt` known by its name (recipes and checkpoints name formats); returns it."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(fmt: str | WeightFormat) -> WeightFormat:
    """The format object of a name (formats register on import of `memfit.weights`); objects pass through."""
    if isinstance(fmt, WeightFormat):
        return fmt
    if fmt not in _REGISTRY:
        raise ConfigError(f"unknown weight format '{fmt}'; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[fmt]
