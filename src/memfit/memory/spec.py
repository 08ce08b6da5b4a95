"""Shapes an estimate is computed from: the model's parameters and the run's batch, sequence and dtypes.

A `RunSpec` is pure data (no tensors), so estimates can be made for models that do not fit in memory:
build it from a live model (`RunSpec.from_model`) or from a transformers config on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from memfit.memory.arch.parts import DTYPE_BYTES  # noqa: F401 - re-exported
from memfit.memory.precision import Precision, legacy
from memfit.memory.precision import precision as precision_named

if TYPE_CHECKING:
    from memfit.memory.arch.base import Arch

Task = Literal["causal_lm", "seq_cls", "token_cls"]


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor: its name, shape, bytes per element, whether it trains, whether it is part of a
    quantized weight's storage (codes, scales: decoded per forward, never cast or saved as a dense copy), and
    whether it is a matmul weight stored transposed, (in, out) (`Conv1D`); `linear_shape` is (out, in) either way."""

    name: str
    shape: tuple[int, ...]
    bytes_per_element: float = 4
    trainable: bool = True
    quantized: bool = False
    transposed: bool = False  # a matmul weight stored (in, out): transformers' `Conv1D` (GPT-2)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return int(round(self.numel * self.bytes_per_element))

    @property
    def linear_shape(self) -> tuple[int, ...]:
        """The shape as `nn.Linear` stores it, (out, in)."""
        return self.shape[::-1] if self.transposed else self.shape


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers activation and KV formulas need, plus every parameter's shape.

    `family` names the block family whose formulas apply (`memory/arch/`; "other": none, and `unsupported` says
    why); `arch` holds the facts read off the model (None for a shape written by hand: the family's defaults)."""

    family: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    params: tuple[ParamInfo, ...] = ()
    buffers_bytes: int = 0
    num_labels: int = 0
    tie_embeddings: bool = False
    arch: Arch | None = None
    unsupported: str = ""

    @property
    def n_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def trainable(self) -> tuple[ParamInfo, ...]:
        return tuple(p for p in self.params if p.trainable)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel for p in self.trainable)


@dataclass(frozen=True)
class RunSpec:
    """A model shape plus the run's shapes: what every `estimate()` receives."""

    model: ModelShape
    batch: int = 1
    seq: int = 128
    task: Task = "causal_lm"
    param_dtype: str = "fp32"
    compute_dtype: str = "fp32"  # autocast dtype for activations
    attn_impl: str = "sdpa"  # "eager" keeps the (B, H, S, S) attention probabilities
    grad_accum: int = 1
    extra: dict = field(default_factory=dict)  # technique-specific facts (e.g. kv budget)
    precision: str | None = None  # a `memory/precision.py` name; None: the one param/compute dtypes describe

    def with_(self, **changes) -> RunSpec:
        return replace(self, **changes)

    @property
    def policy(self) -> Precision:
        """The run's precision policy (the storage dtype of what trains, compute dtype, loss scaling)."""
        if self.precision is not None:
            return precision_named(self.precision)
        return legacy(self.param_dtype, self.compute_dtype)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @classmethod
    def from_model(cls, model: nn.Module, **run) -> RunSpec:
        return cls(model=model_shape(model), **run)


def _config_of(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(model: nn.Module) -> ModelShape:
    """Read a `ModelShape` off a live (or meta-device) transformers model."""
    config = _config_of(model)
    seen: set[int] = set()
    params = []
    transposed = {f"{n}.weight" for n, m in model.named_modules() if is_conv1d(m)}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        params.append(ParamInfo(name, tuple(p.shape), p.element_size(), p.requires_grad,
                                transposed=name in transposed))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if config is None:
        return ModelShape("other", 0, 0, 0, 0, 0, 0, 0, tuple(params), buffers,
                          unsupported=f"{type(model).__name__} has no transformers config to read its architecture")
    from memfit.memory.arch import UnsupportedArchitecture, describe

    common = dict(params=tuple(params), buffers_bytes=buffers, num_labels=getattr(config, "num_labels", 0) or 0,
                  tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)))
    try:
        arch, dims = describe(model, config)
    except UnsupportedArchitecture as exc:  # parameters still count; activation estimates raise this
        return ModelShape("other", **_config_dims(config), **common, unsupported=str(exc))
    return ModelShape(family=arch.family, **dims, **common, arch=arch)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2): a linear layer whose weight is stored (in, out), `nf` outputs."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _config_dims(config) -> dict:
    """What a config says of the shapes, for an architecture no family models (KV-cache estimates use them)."""
    hidden = getattr(config, "hidden_size", 0) or 0
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return dict(n_layers=getattr(config, "num_hidden_layers", 0) or 0, hidden=hidden, n_heads=heads,
                n_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                intermediate=getattr(config, "intermediate_size", 0) or 0, vocab=getattr(config, "vocab_size", 0) or 0)


def cast_trainable(spec: RunSpec) -> RunSpec:
    """The spec with every trainable floating-point parameter stored in the policy's storage dtype (as
    `train.build` casts them once the techniques have applied); frozen parameters keep their bytes."""
    if spec.precision is None:
        return spec
    size = DTYPE_BYTES[spec.policy.storage]
    params = tuple(replace(p, bytes_per_element=size) if p.trainable and p.bytes_per_element in (2, 4) else p
                   for p in spec.model.params)
    if params == spec.model.params:
        return spec
    return spec.with_(model=replace(spec.model, params=params))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}[dtype]
