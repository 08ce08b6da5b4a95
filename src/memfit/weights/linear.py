"""The algorithm around every weight format, written once: `QuantLinear` and quantizing whole models.

`QuantLinear` stores its weight in the tensors its `WeightFormat` names (all `nn.Parameter(requires_grad=False)`,
so memory trackers count them as parameters and `state_dict` / safetensors carry them; PEQA makes the scale
trainable) and decodes it per forward inside a custom autograd function that saves only the stored tensors, not
the decoded copy, so LoRA on top trains without keeping full-precision weights alive for backward — the point
of QLoRA. Formats are passed as objects (`memfit.weights.format`) or by registered name.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import ConfigError
from memfit.memory.spec import is_conv1d
from memfit.weights.format import WeightFormat, get_format


def padded_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """∂L/∂W (out, padded in) in fp32 from a layer's output gradient and saved input: what a trainable part of the
    stored format (PEQA's scales, SketchTune's tables) reduces to its own shape."""
    gw = grad_out.reshape(-1, grad_out.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()
    return F.pad(gw, (0, layer.padded_in - layer.in_features))


class _DequantLinear(torch.autograd.Function):
    """y = x·dequant(W)ᵀ + b that saves the packed weight, not the dequantized one, for backward.

    The gradient w.r.t. the format's trainable tensor (PEQA's per-group scales, SketchTune's tables) is the
    format's reduction of ∂L/∂W (`WeightFormat.scale_grad`); x is saved only when that tensor trains.
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
            gw = padded_weight_grad(grad_out, x, layer)
            grad_scale = layer.format.scale_grad(gw, layer.tensors(), layer.out_features).to(layer.scale_param().dtype)
        return grad_x, grad_scale, None


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored in a `WeightFormat` (int8 / int4 / int3 / NF4) and decoded per
    forward. `fmt` is the format's name; `format` the object.

    `in_scale` (optional, AWQ): per-input-channel factors s; the stored weight is quant(W·diag(s)) and the input
    is divided by s, which is the same product with the salient channels quantized more finely.
    """

    memfit_quantized_weight = True  # techniques.base.QUANTIZED_WEIGHT_MARK: adapters refuse to wrap it
    fused = True
    """Use the format's fused kernel (`WeightFormat.fused_linear`) when no gradient is needed; False: always
    decode, then `F.linear` (the reference the kernels are tested against)."""

    def __init__(self, in_features: int, out_features: int, fmt: str | WeightFormat, group_size: int | None = None,
                 bias: bool = False, in_scale: bool = False, device: torch.device | str | None = None,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        super().__init__()
        self.format = get_format(fmt)
        self.fmt = self.format.name
        self.in_features = self.infeatures = in_features
        self.out_features = self.outfeatures = out_features
        layout = self.format.layout(out_features, in_features, group_size)
        self.group_size, self.padded_in = layout.group_size, layout.padded_in
        self._tensor_names = tuple(layout.tensors)
        shapes = shapes or {}  # a data-dependent format's stored shapes (from a checkpoint)
        for name, (shape, dtype) in layout.tensors.items():
            shape = tuple(shapes.get(name, shape))
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device),
                                                       requires_grad=False))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.in_scale = (nn.Parameter(torch.ones(in_features, device=device), requires_grad=False)
                         if in_scale else None)
        self.compute_dtype = torch.float32

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str | WeightFormat, group_size: int | None = None,
                    in_scale: torch.Tensor | None = None) -> QuantLinear:
        """From an `nn.Linear`, or a transformers `Conv1D` (GPT-2: weight stored (in, out), `x @ W + b`), whose
        transposed weight is the same linear map."""
        w = linear.weight.detach().float()
        if is_conv1d(linear):
            w = w.t()
        out_features, in_features = w.shape
        q = cls(in_features, out_features, fmt, group_size, bias=linear.bias is not None,
                in_scale=in_scale is not None, device=w.device)
        if in_scale is not None:
            q.in_scale.data.copy_(in_scale.float())
            w = w * in_scale.float()[None, :]
        q.load_tensors(q.format.encode(w, q.group_size))
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach().float())
        q.compute_dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.float32
        return q

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._tensor_names}

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        for name, value in t.items():
            param = getattr(self, name)
            # a data-dependent format (entropy-coded) stores tensors whose size the layout only predicts
            shape = value.shape if self.format.variable_size else param.shape
            # clone: a slice of a padded buffer would keep the whole padded storage alive
            param.data = value.to(device=param.device, dtype=param.dtype).reshape(shape).clone()

    def scale_param(self) -> torch.Tensor | None:
        """The per-group float scale (int8/int4/int3), the tensor PEQA trains; None where the format has none."""
        name = self.format.scale_name
        return None if name is None else self._parameters[name]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor, for inspection and merging)."""
        return self.dequantize(self.compute_dtype)

    def make_scale_trainable(self) -> nn.Parameter:
        """PEQA: turn the per-group scale into a trainable fp32 parameter (codes and zero points stay frozen)."""
        name = self.format.scale_name
        if name is None:
            raise ConfigError(self.format.untrainable_scale)
        scale = nn.Parameter(self._parameters[name].detach().float(), requires_grad=True)
        self._parameters[name] = scale
        return scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.format.decode(self.tensors(), self.out_features, self.in_features)
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
        y = None
        if self.fused and not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
            xs = x.to(dtype) if self.in_scale is None else x.to(dtype) / self.in_scale.to(dtype)
            y = self.format.fused_linear(xs, self.tensors(), self.out_features, self.in_features)
        if y is None and not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
            y = F.linear(x.to(dtype), self.dequantize(dtype))  # no graph: skip the autograd.Function's overhead
        if y is None:
            y = _DequantLinear.apply(x.to(dtype), scale, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"group_size={self.group_size}, awq={self.in_scale is not None}")


# --- whole models ---------------------------------------------------------------------------------------------

DEFAULT_SKIP = ("lm_head",)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """A module name matches a pattern: equal, a dotted suffix, its last part, or one of its parts."""
    return any(name == p or name.endswith("." + p) or name.split(".")[-1] == p or p in name.split(".")
               for p in patterns)


def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP,
                        target: Iterable[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` (and transformers `Conv1D`) modules `quantize_model` would replace (targets: module names or
    name suffixes)."""
    skip = tuple(skip)
    found = []
    for name, mod in model.named_modules():
        if not name or matches(name, skip):
            continue
        if target is not None and not matches(name, target):
            continue
        if isinstance(mod, nn.Linear) or is_conv1d(mod):
            found.append((name, mod))
        elif (target is not None and matches(name, target) and not isinstance(mod, QuantLinear)
              and (next(mod.children(), None) is None or any(True for _ in mod.parameters(recurse=False)))):
            raise ConfigError(f"cannot quantize '{name}' ({type(mod).__name__}): weight-only quantization "
                                  "applies to nn.Linear layers; remove it from the targets")
    return found


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, fmt: str | WeightFormat, group_size: int | None = None,
                   skip: Iterable[str] = DEFAULT_SKIP, target: Iterable[str] | None = None,
                   in_scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace every `nn.Linear` / `Conv1D` (except `skip`, optionally only `target`) with a `QuantLinear`, in place.

    Targeting a module that is not a linear layer raises `ConfigError`.
    """
    fmt = get_format(fmt)
    linears = quantizable_linears(model, skip, target)
    if not linears:
        raise ConfigError("no nn.Linear layer to quantize: check 'skip' / 'target'")
    for name, lin in linears:
        scale = in_scales.get(name) if in_scales else None
        set_submodule(model, name, QuantLinear.from_linear(lin, fmt, group_size, in_scale=scale))
    kept = [name for name, _ in linears if not isinstance(model.get_submodule(name), QuantLinear)]
    if kept:
        from memfit.compat import fail

        raise fail(f"weights {fmt.name}: {len(kept)} linear layers (e.g. {kept[0]}) are still dense after "
                   "replacement", "each nn.Linear to be an attribute of its parent module", ("torch", "transformers"))
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
