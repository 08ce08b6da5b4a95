"""Read what a norm or an activation saves for backward by running it once on a tiny real input.

The model may live on the meta device, so the module runs through `torch.func.functional_call` with small real
parameters; `torch.autograd.graph.saved_tensors_hooks` sees every tensor its backward will need. The input is
bf16, so an fp32 copy of it (RMSNorm's `pow`) is told apart from the input itself; tensors are classified by
shape (per element, per row, per channel) and grouped by storage, as the memory meter counts them. Parameters
require gradients, so what their gradients need (a norm's normalized input) is saved as in training; a module with
parameters is probed again with them frozen (`Saves.frozen`) and with an input that needs no gradient
(`Saves.leaf`), for partly frozen models (`arch/flow.py`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from memfit.memory.arch.base import Saves, UnsupportedArchitecture

_ROWS, _WIDTH = 3, 8  # distinct, so a per-row tensor is never mistaken for a per-channel one


def probe(module: nn.Module, width: int | None = None, backward: bool = False) -> Saves:
    """What `module` (parameters of any shape, on any device) saves per call; with `backward`, also how many
    input-sized tensors its backward holds at once (measured with `MemoryMeter`). Cached per class and shapes."""
    params = tuple((name, tuple(p.shape)) for name, p in module.named_parameters())
    buffers = tuple(module.named_buffers())
    if buffers:
        raise UnsupportedArchitecture(f"{type(module).__name__} holds buffers; memfit cannot probe what it saves")
    shape = getattr(module, "normalized_shape", None)  # a parameter-free LayerNorm still fixes its width (OLMo)
    channels = params[0][1][-1] if params else (width or (int(shape[-1]) if shape else _WIDTH))
    saves = _probe(module, params, channels)
    if params:  # what it saves with its weights frozen, and with an input that needs no gradient
        saves = replace(saves, frozen=_probe(module, params, channels, weight_grad=False),
                        leaf=_probe(module, params, channels, input_grad=False))
    if backward and not params:
        key = (type(module), "backward", _state(module))
        if key not in _CACHE:
            _CACHE[key] = replace(saves, backward=_backward_peak(module))
        saves = _CACHE[key]
    return saves


def _backward_peak(module: nn.Module) -> int:
    """Input-sized tensors alive at once while a parameter-free module's backward runs (its input's gradient
    included): the meter's temporaries peak over one backward, in units of the input."""
    from memfit.memory.measure import MemoryMeter

    wrapper = nn.Sequential(module)
    meter = MemoryMeter(wrapper)
    with meter.region(), torch.enable_grad():
        x = torch.randn(_ROWS * 16, _WIDTH * 16, requires_grad=True)
        y = wrapper(x)
        y.backward(torch.ones_like(y))
    return max(1, round(meter.report().category_peaks.temporaries / x.nbytes))


_CACHE: dict[tuple, Saves] = {}


def _probe(module: nn.Module, params: tuple, channels: int, input_grad: bool = True,
           weight_grad: bool = True) -> Saves:
    key = (type(module), params, channels, _state(module), input_grad, weight_grad)
    if key not in _CACHE:
        _CACHE[key] = _run(module, params, channels, input_grad, weight_grad)
    return _CACHE[key]


def _state(module: nn.Module) -> tuple:
    """Plain attributes that may change what a module saves (eps does not; an approximation flag might)."""
    return tuple(sorted((k, v) for k, v in vars(module).items()
                        if not k.startswith("_") and isinstance(v, (bool, int, float, str))))


def _run(module: nn.Module, params: tuple, channels: int, input_grad: bool = True, weight_grad: bool = True
         ) -> Saves:
    dtype = torch.bfloat16
    real = {name: torch.full(shape, 0.5, dtype=dtype, requires_grad=weight_grad) for name, shape in params}
    x = torch.randn(_ROWS, channels, dtype=dtype, requires_grad=input_grad)
    own = {t.untyped_storage().data_ptr() for t in real.values()}
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and t.untyped_storage().nbytes():
            saved.setdefault(ptr, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        out = torch.func.functional_call(module, real, (x,))
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise UnsupportedArchitecture(f"{type(module).__name__} does not map a tensor to one of the same shape")
    counts = dict(input=False, upcast=False, elem=0, elem_fp32=0, row_fp32=0, width_fp32=0, output=False)
    for ptr, t in saved.items():
        if ptr == x.untyped_storage().data_ptr():
            counts["input"] = True
        elif ptr == out.untyped_storage().data_ptr():
            counts["output"] = True
            counts["elem"] += 1
        elif t.numel() == x.numel() and t.dtype == torch.float32 and torch.equal(t.reshape(x.shape), x.float()):
            counts["upcast"] = True
        elif t.numel() == x.numel():
            counts["elem" if t.dtype == dtype else "elem_fp32"] += 1
        elif t.numel() == _ROWS:  # statistics: fp32 on CUDA; CPU's bf16 LayerNorm keeps bf16 (2 bytes a row)
            counts["row_fp32"] += 1
        elif t.numel() == channels and t.dtype == torch.float32:
            counts["width_fp32"] += 1
        elif t.numel() > 1:
            raise UnsupportedArchitecture(f"{type(module).__name__} saves a {tuple(t.shape)} {t.dtype} tensor for "
                                          f"an input of {tuple(x.shape)}; memfit cannot size it")
    return Saves(**counts)


def bytes_per_row(module: nn.Module, width: int) -> int:
    """Bytes `module` saves per row of a (rows, `width`) fp32 input, besides the input itself (e.g. a MoE
    router: its fp32 probabilities, top-k indices and weights). Checked to grow linearly with the rows."""
    params = {name: torch.full(tuple(p.shape), 0.5, requires_grad=True) for name, p in module.named_parameters()}
    own = {t.untyped_storage().data_ptr() for t in params.values()}

    def saved_bytes(rows: int) -> int:
        x = torch.randn(rows, width, requires_grad=True)
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in own and st.data_ptr() != x.untyped_storage().data_ptr():
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            torch.func.functional_call(module, params, (x,))
        return sum(seen.values())

    small, large = saved_bytes(_ROWS), saved_bytes(2 * _ROWS)
    if large != 2 * small:
        raise UnsupportedArchitecture(f"{type(module).__name__} saves {small} bytes for {_ROWS} rows and {large} "
                                      f"for {2 * _ROWS}; memfit cannot size it")
    return small // _ROWS
