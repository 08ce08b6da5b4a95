"""Shared pieces of the `activations` slot: finding a model's parts, token labels, low-bit packing,
saved-tensor hooks, and the composed activation estimate (built on `memfit.memory.estimate`'s per-component
sizes, re-sliced per chunk and per layer for each technique's schedule of what is kept and recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import ConfigError
from memfit.memory import estimate as est
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec

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


def check_chunk(chunk: int, what: str = "chunk_size") -> None:
    if chunk <= 0:
        raise ConfigError(f"{what} must be a positive number of tokens, got {chunk}")


def other_techniques(ctx, name: str) -> list:
    return [t for t in getattr(ctx, "techniques", []) or [] if getattr(t, "name", None) == name]


# --- low-bit packing (compressed saved activations) -------------------------------------------------


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization with one (scale, min) pair per slice along `dim` (a channel or
    a head). Returns (codes uint8 — two 4-bit codes per byte when bits == 4, scale, min).
    Round-to-nearest: |x - dequantize(x)| <= scale / 2 = (max - min) / (2 (2^bits - 1)) per slice."""
    dim = dim % x.dim()
    reduce = [d for d in range(x.dim()) if d != dim]
    xf = x.float()
    lo = xf.amin(dim=reduce, keepdim=True)
    hi = xf.amax(dim=reduce, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    codes = ((xf - lo) / scale).round_().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        flat = codes.flatten()
        if flat.numel() % 2:
            flat = F.pad(flat, (0, 1))
        codes = flat[0::2] | (flat[1::2] << 4)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, shape: torch.Size,
               dtype: torch.dtype) -> torch.Tensor:
    if bits == 4:
        n = 1
        for s in shape:
            n *= s
        codes = torch.stack((codes & 0x0F, codes >> 4), dim=1).flatten()[:n].view(shape)
    return (codes.float() * scale + lo).to(dtype)


# --- component sizes (bytes) used by the estimates ------------------------------------------------
# Per-layer and head sizes come from `memfit.memory.estimate` (one activation model for the whole project);
# these helpers only re-slice them for a chunk of tokens.


def _act_bytes(spec: RunSpec) -> int:
    return est.dtypes(spec).compute


def _slice(spec: RunSpec, tokens: int | None, seq: int | None) -> RunSpec:
    s = spec.seq if seq is None else seq
    t = spec.tokens if tokens is None else tokens
    return spec.with_(batch=max(t // max(s, 1), 1), seq=s)


def kv_dim(spec: RunSpec) -> int:
    return spec.model.n_kv_heads * spec.model.head_dim


def layer_bytes(spec: RunSpec, tokens: int | None = None, seq: int | None = None) -> int:
    """Tensors one decoder layer saves for backward, for `tokens` tokens in sequences of `seq`."""
    return sum(est.layer_components(_slice(spec, tokens, seq)).values())


def layer_input_bytes(spec: RunSpec, tokens: int | None = None) -> int:
    """One hidden-state tensor (a layer's input): what a checkpointed layer keeps."""
    t = spec.tokens if tokens is None else tokens
    return t * spec.model.hidden * est.dtypes(spec).residual


def rope_bytes(spec: RunSpec, seq: int | None = None) -> int:
    """The cos/sin tables shared by every layer."""
    return est.head_components(_slice(spec, None, seq)).get("embeddings", 0)


def norm_bytes(spec: RunSpec, tokens: int | None = None) -> int:
    """The final norm's saved tensors and the LM head's input."""
    h = est.head_components(_slice(spec, tokens, None if tokens is None else min(tokens, spec.seq)))
    return h.get("final_norm", 0) + h.get("head", 0)


def logits_bytes(spec: RunSpec, tokens: int | None = None) -> int:
    """LM head + cross-entropy: the logits (kept by a transformers model's output) and the loss's fp32
    log-probabilities and targets."""
    t = spec.tokens if tokens is None else tokens
    sub = _slice(spec, t, min(t, spec.seq))
    return est.head_components(sub).get("loss", 0) + t * spec.model.vocab * max(_act_bytes(spec), 4)


def ids_bytes(spec: RunSpec) -> int:
    return spec.tokens * 8


# --- the composed estimate ------------------------------------------------------------------------
# Each activation technique records what it does in `spec.extra` (its `transform_spec`), and every one of
# them estimates with `activation_estimate(spec)`, so the result does not depend on the list's order.

EXTRA_KEY = "activations"


def with_extra(spec: RunSpec, phases: str | None = None, **facts) -> RunSpec:
    """Record an activation technique's facts; the step peak then follows `phases` ("module:function"), by
    default the shared `activation_phases`."""
    extra = dict(spec.extra)
    extra[EXTRA_KEY] = {**extra.get(EXTRA_KEY, {}), **facts}
    if phases:
        extra[est.STEP_PHASES_KEY] = phases
    else:
        extra.setdefault(est.STEP_PHASES_KEY, f"{__name__}:activation_phases")
    return spec.with_(extra=extra)


def facts(spec: RunSpec) -> dict:
    return dict(spec.extra.get(EXTRA_KEY, {}))


def module_saved_bytes(spec: RunSpec, kind: str, tokens: int) -> int:
    """Bytes a Llama sub-module saves beyond its own input (which a checkpoint of it still keeps)."""
    parts = est.layer_components(_slice(spec, tokens, None))
    inp = tokens * spec.model.hidden * _act_bytes(spec)
    if "mlp" in kind.lower():
        return max(parts["mlp"] - inp, 0)
    if "attention" in kind.lower():
        return max(parts["attention"] - inp, 0)
    return 0


def compressed_bytes(spec: RunSpec, nbytes: int, bits: int) -> int:
    """Saved float tensors re-stored at `bits` per element (scales are negligible)."""
    return int(nbytes * bits / (8 * _act_bytes(spec)))


@dataclass(frozen=True)
class _Layout:
    """Where forward-produced bytes sit under the recorded techniques (all but StreamBP)."""

    fixed: int  # token ids, RoPE tables, autocast weight copies
    kept: list[int]  # per layer: bytes kept after forward
    working: list[int]  # per layer: bytes alive while its backward runs (recomputed / unpacked in full)
    head_saved: int  # final norm and loss head, kept for backward
    head_transient: int  # loss-head tensors alive only while forward computes the loss
    compressing: list[int]  # per layer: extra bytes while it runs forward compressed (0: not compressed)


def _layout(spec: RunSpec) -> _Layout:
    f = facts(spec)
    m = spec.model
    layer = layer_bytes(spec)
    bits = f.get("saved_bits")
    ckpt = f.get("checkpoint") or {}
    chosen = set(range(0, m.n_layers, ckpt["every"])) if ckpt else set()
    inner = sum(module_saved_bytes(spec, kind, spec.tokens) for kind in ckpt.get("modules") or [])
    plain = compressed_bytes(spec, layer, bits) if bits else layer
    kept, working = [], []
    for i in range(m.n_layers):
        if i not in chosen:
            kept.append(plain)
            working.append(layer if bits else plain)  # a compressed layer is unpacked in full for backward
        elif inner:
            rest = layer - inner
            kept.append(compressed_bytes(spec, rest, bits) if bits else rest)
            working.append(layer)
        else:
            kept.append(layer_input_bytes(spec))
            working.append(layer)
    head_saved, head_transient = norm_bytes(spec), 0
    if spec.task == "causal_lm":
        chunk = est.loss_chunk(spec)
        if chunk:  # a log-sum-exp and target per token saved; one chunk's fp32 logits in flight (measured:
            # CPU's log-sum-exp makes no second chunk-sized copy)
            head_saved += 12 * spec.tokens
            head_transient = chunk * spec.model.vocab * 4
        else:  # log-probabilities saved; the logits alive while the loss is computed
            loss = est.head_components(spec)["loss"]
            head_saved += loss
            head_transient = logits_bytes(spec) - loss
    # while a compressed layer runs forward, its full-precision tensors, their packed copies and the quantizer's
    # scratch (two of the largest, MLP-wide tensors) are alive together
    scratch = layer + 2 * spec.tokens * m.intermediate * _act_bytes(spec)
    compressing = [scratch if bits and i not in chosen else 0 for i in range(m.n_layers)]
    fixed = ids_bytes(spec) + rope_bytes(spec) + est.weight_cast_bytes(spec)
    return _Layout(fixed, kept, working, head_saved, head_transient, compressing)


def activation_estimate(spec: RunSpec) -> int:
    """Peak bytes of forward-produced tensors for a causal-LM step with the recorded techniques applied.

    Forward ends holding: token ids, RoPE tables, what each layer keeps, the final norm and the loss head's
    tensors; backward then recomputes at most one checkpointed module (or one StreamBP chunk) at a time.
    """
    f = facts(spec)
    stream = f.get("streambp_chunk")
    if stream:
        return ids_bytes(spec) + rope_bytes(spec) + streambp_bytes(spec, stream)
    lay = _layout(spec)
    head = lay.head_saved + lay.head_transient
    if f.get("offload_device", False):
        # on an accelerator, saved tensors live in host memory; the device holds one layer in flight
        return lay.fixed + head + layer_bytes(spec)
    peak = sum(lay.kept) + head
    for i in range(spec.model.n_layers):  # backward runs from the last layer down, freeing as it goes
        peak = max(peak, sum(lay.kept[:i]) + lay.working[i])
        if lay.compressing[i]:
            peak = max(peak, sum(lay.kept[:i]) + lay.kept[i] + lay.compressing[i])
    return lay.fixed + peak


def activation_phases(spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
    """Step phases under checkpointing / chunked CE / compressed saved tensors (the `step_phases` hook these
    techniques register): forward's loss head, the start of backward (everything kept + the loss head's
    backward transients), each layer's backward from the top (layers below still kept, this one recomputed or
    unpacked, gradients of the head and the layers above made, the block's transients), the optimizer step."""
    m = spec.model
    lay = _layout(spec)
    fixed = est.fixed_bytes(breakdown) + lay.fixed
    grads = breakdown.gradients
    held = grads if spec.grad_accum > 1 else 0
    mlp_tmp, attn_tmp = est.block_backward_temporaries(spec)
    parts = est.layer_components(spec)
    # inside one layer's backward (as in plain backprop's phases): the MLP's transients while the layer is whole,
    # then the attention's once the MLP's saved tensors and the norms' are freed
    in_layer = max(mlp_tmp - parts["norms"] // 2, attn_tmp - parts["mlp"] - parts["norms"])
    kept = sum(lay.kept)
    phases = {
        "forward_head": fixed + held + kept + lay.head_saved + lay.head_transient,
        "backward_start": fixed + held + kept + lay.head_saved + est.head_backward_temporaries(spec),
        "optimizer_step": fixed + grads + est.optimizer_step_transients(spec, breakdown),
    }
    for i in reversed(range(m.n_layers)):
        done = est.gradients_made(spec, breakdown, m.n_layers - i)
        phases[f"layer_{i}"] = fixed + max(held, done) + sum(lay.kept[:i]) + lay.working[i] + in_layer
    return phases


def streambp_bytes(spec: RunSpec, chunk: int) -> int:
    """StreamBP: every layer's input kept (L+1 hidden states), plus the working set of one layer's backward:
    the full-sequence K/V path (norm, k/v projections and RoPE with their graph) and one chunk's layer
    activations, or one chunk's loss head (final norm, logits and log-probabilities, alive together as the
    chunk's loss is computed)."""
    m = spec.model
    c = min(chunk, spec.seq)
    batch = spec.batch
    inputs = (m.n_layers + 1) * layer_input_bytes(spec)
    kv_path = spec.tokens * (3 * m.hidden + 1 + 5 * kv_dim(spec)) * _act_bytes(spec)
    chunk_layer = layer_bytes(spec, tokens=batch * c, seq=c)
    head = norm_bytes(spec, batch * c) + logits_bytes(spec, batch * c)
    grads = 2 * layer_input_bytes(spec)  # the gradient w.r.t. the current layer's output and input
    return inputs + grads + max(kv_path + chunk_layer, head)


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


class CompressHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep floating tensors saved for backward at `bits` per element (per-head scales
    for 4-D attention tensors, per-channel — last dimension — otherwise). Forward is untouched; backward sees
    the dequantized tensors. A tensor saved by several ops is packed once (the cache holds the originals only
    while the wrapped module runs, so an address cannot be reused meanwhile)."""

    def __init__(self, bits: int, params: set[int], min_numel: int = 1024) -> None:
        self.bits, self.params, self.min_numel = bits, params, min_numel
        self.cache: dict[tuple, tuple[torch.Tensor, Any]] = {}
        self.packed_bytes = 0
        self.original_bytes = 0
        super().__init__(self.pack, self.unpack)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.cache.clear()

    def pack(self, t: torch.Tensor):
        if (not t.is_floating_point() or t.dim() < 2 or t.numel() < self.min_numel or is_weight(t, self.params)):
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version)
        hit = self.cache.get(key)
        if hit is not None:
            return hit[1]
        dim = 1 if t.dim() == 4 else -1
        codes, scale, lo = quantize(t.detach(), self.bits, dim)
        packed = (codes, scale, lo, t.shape, t.dtype)
        self.cache[key] = (t, packed)
        self.original_bytes += t.numel() * t.element_size()
        self.packed_bytes += codes.numel() + 4 * (scale.numel() + lo.numel())
        return packed

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        codes, scale, lo, shape, dtype = packed
        return dequantize(codes, scale, lo, self.bits, shape, dtype)
