"""Shared pieces of the `activations` slot: finding a model's parts, token labels, low-bit packing and
saved-tensor hooks. The slot's memory model is `memfit.activations.layout`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import ConfigError

IGNORE_INDEX = -100

# --- the model's parts ----------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (adapter layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest `ModuleList` whose entries share one class."""
    best: nn.ModuleList | None = None
    for module in unwrap(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}; this technique needs a "
                          "transformers model with a list of transformer blocks")
    return best


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, head) of a transformers causal LM: `body(input_ids=...)` returns the final hidden states
    (final norm applied) and `head` maps them to logits."""
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    prefix = getattr(inner, "base_model_prefix", "model")
    body = getattr(inner, prefix, None)
    if head is None or body is None or body is inner:
        raise ConfigError(f"{type(inner).__name__} is not a causal LM with a separate output head; chunked loss "
                          "needs a transformers *ForCausalLM model")
    config = getattr(inner, "config", None)
    if config is not None and getattr(config, "final_logit_softcapping", None):
        raise ConfigError("the model soft-caps its logits; chunked cross-entropy does not support that")
    return body, head


def shifted_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets aligned with positions: target[t] = labels[t+1], last position ignored
    (the transformers convention; padding positions set to -100 by the attention mask)."""
    labels = batch.get("labels", batch["input_ids"])
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def check_causal_lm(ctx, name: str) -> None:
    """A technique that restructures the next-token loss refuses other tasks."""
    if ctx.spec.task != "causal_lm":
        raise ConfigError(f"{name} applies to causal_lm training, not '{ctx.spec.task}'")


def check_chunk(chunk: int, what: str = "chunk_size") -> None:
    if chunk <= 0:
        raise ConfigError(f"{what} must be a positive number of tokens, got {chunk}")


# --- low-bit packing (compressed saved activations) -------------------------------------------------


def quantize(x: torch.Tensor, bits: int, dim: int, packed: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization with one (scale, min) pair per slice along `dim` (a channel or
    a head). Returns (codes uint8 — two 4-bit codes per byte when bits == 4 and `packed`, scale, min).
    Round-to-nearest: |x - dequantize(x)| <= scale / 2 = (max - min) / (2 (2^bits - 1)) per slice."""
    dim = dim % x.dim()
    reduce = [d for d in range(x.dim()) if d != dim]
    xf = x.float()
    lo = xf.amin(dim=reduce, keepdim=True)
    hi = xf.amax(dim=reduce, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((xf - lo) / scale).round_().clamp_(0, levels).to(torch.uint8)
    return (pack_nibbles(codes) if bits == 4 and packed else codes), scale, lo


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8 values < 16), two per byte, flattened."""
    flat = codes.flatten()
    if flat.numel() % 2:
        flat = F.pad(flat, (0, 1))
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=1).flatten()[:n]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, shape: torch.Size,
               dtype: torch.dtype) -> torch.Tensor:
    if bits == 4:
        codes = unpack_nibbles(codes, shape.numel()).view(shape)
    return (codes.float() * scale + lo).to(dtype)


_BIT = 1 << torch.arange(8, dtype=torch.uint8)


def prune(x: torch.Tensor, keep: float) -> torch.Tensor:
    """The mask (bool, `x`'s shape) of the entries of largest magnitude: ⌈keep · numel⌉ of them, fewer where
    entries tie at the threshold (zeros — masked attention — are dropped first; restored, they are exact).
    A threshold by selection, not `topk`: its values and int64 indices would take 12 bytes per kept entry."""
    a = x.detach().abs()
    drop = x.numel() - kept_count(x.numel(), keep)
    if drop <= 0:
        return torch.ones_like(a, dtype=torch.bool)
    return a > a.reshape(-1).kthvalue(drop).values


def kept_count(n: int, keep: float) -> int:
    return max(1, math.ceil(keep * n))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as a bitmap: ⌈numel / 8⌉ bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _BIT.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = (packed.unsqueeze(1) & _BIT.to(packed.device)) != 0
    return bits.reshape(-1)[:shape.numel()].view(shape)


# --- saved-tensor hooks shared by offload and compression ----------------------------------------


def param_storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def is_weight(t: torch.Tensor, params: set[int]) -> bool:
    """A parameter, or an autocast copy of one (saved by linear layers; never an activation)."""
    if isinstance(t, torch.nn.Parameter) or t.untyped_storage().data_ptr() in params:
        return True
    fn = t.grad_fn
    if fn is not None and type(fn).__name__ == "ToCopyBackward0":
        return any(type(n).__name__ == "AccumulateGrad" for n, _ in fn.next_functions if n is not None)
    return False


def wrap_forward(module: torch.nn.Module, tag: str, make_context) -> None:
    """Run `module.forward` (training, grad enabled) inside `make_context()`; idempotent per `tag`."""
    attr = f"_memfit_{tag}"
    if getattr(module, attr, False):
        return
    original = module.forward

    def forward(*args, **kwargs):
        if not (torch.is_grad_enabled() and module.training):
            return original(*args, **kwargs)
        with make_context():
            return original(*args, **kwargs)

    module.forward = forward
    setattr(module, attr, True)


SOFTMAX_BACKWARD = ("SoftmaxBackward0", "SafeSoftmaxBackward0")
"""autograd nodes of softmax outputs: eager attention's, and SDPA's math kernel's `_safe_softmax`."""


class CompressHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep floating tensors saved for backward at `bits` per element (per-head scales
    for 4-D attention tensors, per-channel — last dimension — otherwise). Forward is untouched; backward sees
    the dequantized tensors. With `keep` < 1 (SlimFit's pruning) the attention probabilities — softmax outputs,
    mostly near zero — keep only their ⌈keep · numel⌉ largest entries: a bitmap of their places and their codes
    (`bits` each); backward sees zeros elsewhere. (Pruning other saved tensors — norms' inputs, q and k that
    fused attention re-scores — wrecks the gradient: measured relative error > 40 on MiniLM at keep 0.5.)
    A tensor whose values or range are not finite in its dtype (an additive attention mask with −inf / the
    dtype's minimum, saved by SDPA) stays as it is: dequantized, it would turn into NaN.
    A tensor saved by several ops is packed once (the cache holds the originals only while the wrapped module
    runs, so an address cannot be reused meanwhile)."""

    def __init__(self, bits: int, params: set[int], min_numel: int = 1024, keep: float = 1.0) -> None:
        self.bits, self.params, self.min_numel, self.keep = bits, params, min_numel, keep
        self.cache: dict[tuple, tuple[torch.Tensor, Any]] = {}
        self.packed_bytes = 0
        self.original_bytes = 0
        self.pruned = 0  # tensors pruned (attention probabilities)
        super().__init__(self.pack, self.unpack)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.cache.clear()

    def pack(self, t: torch.Tensor):
        if (not t.is_floating_point() or t.dim() < 2 or t.numel() < self.min_numel or is_weight(t, self.params)):
            return t
        # a contiguous tensor saved again under another shape (a batched matmul's view of the probabilities) is
        # packed once and viewed
        layout = (t.numel(),) if t.is_contiguous() else (tuple(t.shape), tuple(t.stride()))
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), layout, t._version)
        hit = self.cache.get(key)
        if hit is not None:
            return hit[1] if hit[0].shape == t.shape else (hit[1], t.shape)
        dim = 1 if t.dim() == 4 else -1
        x = t.detach()
        codes, scale, lo = quantize(x, self.bits, dim, packed=False)
        if not torch.isfinite(lo + scale * ((1 << self.bits) - 1)).all():
            return t  # infinite values or a range past the dtype's (an additive attention mask): kept as it is
        where = None
        if self.keep < 1 and type(t.grad_fn).__name__ in SOFTMAX_BACKWARD:
            mask = prune(x, self.keep)
            self.pruned += 1
            codes, where = codes[mask], pack_bits(mask)  # the kept entries' codes, in order, and their places
        codes = pack_nibbles(codes) if self.bits == 4 else codes
        packed = (codes, scale, lo, t.shape, t.dtype, where)
        self.cache[key] = (t, packed)
        self.original_bytes += t.numel() * t.element_size()
        self.packed_bytes += (codes.numel() + 4 * (scale.numel() + lo.numel())
                              + (0 if where is None else where.numel()))
        return packed

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if len(packed) == 2:  # another shape of a packed contiguous tensor
            return self.unpack(packed[0]).view(packed[1])
        codes, scale, lo, shape, dtype, where = packed
        if where is None:
            return dequantize(codes, scale, lo, self.bits, shape, dtype)
        mask = unpack_bits(where, shape)
        kept = unpack_nibbles(codes, int(mask.sum())) if self.bits == 4 else codes
        full = torch.zeros(shape, dtype=torch.uint8, device=codes.device)
        full[mask] = kept
        return torch.where(mask, full.float() * scale + lo, 0.0).to(dtype)
