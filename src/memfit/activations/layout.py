"""The activation slot's memory model: where forward-produced bytes sit between forward and backward.

Sizes come from `memfit.memory.estimate` (one activation model for the whole project); this module re-slices
them per layer and per chunk of tokens and composes the techniques that change them. A plain backprop step
keeps every layer's saved tensors and the loss head's; each technique that changes this (checkpointing, chunked
CE, Mesa / S2A, offload) records itself in the spec (`record`) and reshapes the layout in its own
`shape_layout`; the estimate and the step phases are then read off the composed layout, the same for all of
them, so the result does not depend on the order of the recipe's list:

- a layer's plan (`LayerPlan`) says what forward keeps of it: its saved tensors, an exact part (a checkpoint's
  input), whether it is recomputed in backward, the bits its saved tensors are stored at;
- the head keeps its saved tensors, has transients while forward computes the loss, and gradients as backward
  starts; `on_host` places saved tensors in host memory (offload on an accelerator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import reduce

from memfit.memory import estimate as est
from memfit.memory.arch import parts
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Technique

# --- component sizes, re-sliced for a chunk of tokens ------------------------------------------------------


def act_bytes(spec: RunSpec) -> int:
    """Bytes per element of the tensors a forward saves (the compute dtype)."""
    return est.dtypes(spec).compute


def sliced(spec: RunSpec, tokens: int | None, seq: int | None) -> RunSpec:
    s = spec.seq if seq is None else seq
    t = spec.tokens if tokens is None else tokens
    return spec.with_(batch=max(t // max(s, 1), 1), seq=s)


def kv_dim(spec: RunSpec) -> int:
    return spec.model.n_kv_heads * spec.model.head_dim


def layer_bytes(spec: RunSpec, tokens: int | None = None, seq: int | None = None) -> int:
    """Tensors one decoder layer saves for backward, for `tokens` tokens in sequences of `seq`."""
    return sum(est.layer_components(sliced(spec, tokens, seq)).values())


def layer_input_bytes(spec: RunSpec, tokens: int | None = None) -> int:
    """One hidden-state tensor (a layer's input): what a checkpointed layer keeps."""
    t = spec.tokens if tokens is None else tokens
    return t * spec.model.hidden * est.dtypes(spec).residual


def rope_bytes(spec: RunSpec, seq: int | None = None) -> int:
    """The cos/sin tables shared by every layer."""
    return est.head_components(sliced(spec, None, seq)).get("embeddings", 0)


def norm_bytes(spec: RunSpec, tokens: int | None = None) -> int:
    """The final norm's saved tensors and the LM head's input."""
    h = est.head_components(sliced(spec, tokens, None if tokens is None else min(tokens, spec.seq)))
    return h.get("final_norm", 0) + h.get("head", 0)


def logits_bytes(spec: RunSpec, tokens: int | None = None) -> int:
    """LM head + cross-entropy: the logits (kept by a transformers model's output) and the loss's fp32
    log-probabilities and targets."""
    t = spec.tokens if tokens is None else tokens
    sub = sliced(spec, t, min(t, spec.seq))
    return est.head_components(sub).get("loss", 0) + t * spec.model.vocab * max(act_bytes(spec), 4)


def ids_bytes(spec: RunSpec) -> int:
    return spec.tokens * 8


def linear_inputs_bytes(spec: RunSpec) -> int:
    """Bytes of one block's saved tensors that only its linear layers keep, for their weight gradients (what a
    block with frozen weights does not save; what WTA-CRS samples). Llama blocks: the projections' shared input
    (or their cast copies), the MLP's input, the product `down_proj` reads, and `o_proj`'s input where it is a
    copy of the attention output rather than SDPA's own saved output (eager; SDPA re-laid out). BERT blocks: the
    projections' input, the context the output projection reads, the intermediate dense's input and the GELU
    output the output dense reads."""
    m, a, d = spec.model, spec.model.arch, parts.dtypes(spec)
    t = spec.tokens
    if m.family == "bert":
        return (parts.matmul_inputs(t, m.hidden, 3, d) + t * m.hidden * d.compute
                + parts.matmul_inputs(t, m.hidden, 1, d) + t * m.intermediate * d.compute)
    fused_qkv = a is not None and a.fused_qkv
    fused_gate_up = a is not None and a.fused_gate_up
    out = parts.matmul_inputs(t, m.hidden, 1 if fused_qkv else 3, d)
    out += parts.matmul_inputs(t, m.hidden, 1 if fused_gate_up else 2, d)
    out += t * m.intermediate * d.compute
    if parts.attention_kernel(spec) != "flash" or (a is not None and a.relaid_output):
        out += t * m.n_heads * m.head_dim * d.compute
    return out


def compressed_bytes(spec: RunSpec, nbytes: int, bits: int) -> int:
    """Saved float tensors re-stored at `bits` per element, with one fp32 (scale, min) pair per channel (a saved
    activation's elements over the tokens; negligible but at a few tokens)."""
    n = nbytes // act_bytes(spec)
    return int(n * bits / 8) + 8 * n // max(spec.tokens, 1)


def quantizer_scratch(spec: RunSpec) -> int:
    """`_common.quantize` of the largest (MLP-wide) saved tensor works in fp32: the shifted and the scaled copy,
    and the fp32 upcast first unless the tensor is fp32 already."""
    return (2 + (act_bytes(spec) < 4)) * spec.tokens * spec.model.intermediate * 4


def softmax_outputs(spec: RunSpec) -> tuple[int, int]:
    """(elements, bytes) of the attention probabilities one layer saves as softmax's output (fp32 on CPU and in
    eager attention); none under SDPA's fused kernel."""
    kernel = parts.attention_kernel(spec)
    if kernel == "flash":
        return 0, 0
    n = spec.batch * spec.model.n_heads * spec.seq * spec.seq
    d = parts.dtypes(spec)
    return n, n * (4 if kernel == "eager" or d.device == "cpu" else d.compute)


def pruned_bytes(elements: int, bits: int, keep: float) -> int:
    """`elements` pruned to the ⌈keep · elements⌉ largest, their `bits`-bit codes plus a bitmap of their places
    (`activations/_common.CompressHooks`)."""
    kept = elements if keep >= 1 else max(1, math.ceil(keep * elements)) if elements else 0
    return math.ceil(kept * bits / 8) + (math.ceil(elements / 8) if keep < 1 else 0)


# --- the layout ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """What forward keeps of one decoder layer for its backward."""

    saved: int  # saved tensors kept (re-stored at `bits` if set)
    exact: int = 0  # bytes kept as they are (a checkpointed layer's input)
    recomputed: bool = False  # forward ran inside a checkpoint; backward recomputes what it dropped
    bits: int | None = None  # saved tensors stored at this many bits per element
    pack_scratch: int = 0  # bytes alive while a forward outside a checkpoint packs its saved tensors
    keep: float = 1.0  # fraction of the attention probabilities' entries kept (pruned by magnitude; with `bits`)
    probs: tuple[int, int] = (0, 0)  # (elements, bytes) of `saved` that are attention probabilities
    casts: int = 0  # autocast's weight casts autograd saved, re-stored at `bits` too (the hooks see them)
    forward_only: int = 0  # kept in full beside the re-stored copies until the loss (the KV cache's entries)

    def kept(self, spec: RunSpec) -> int:
        if not self.bits:
            return self.exact + self.saved
        n, nbytes = self.probs
        return (self.exact + compressed_bytes(spec, self.saved - nbytes, self.bits)
                + pruned_bytes(n, self.bits, self.keep) + compressed_bytes(spec, self.casts, self.bits))

    def kept_casts(self) -> bool:
        return bool(self.bits and self.casts)

    def packing(self) -> int:
        return self.pack_scratch if self.bits and not self.recomputed else 0


@dataclass(frozen=True)
class ActivationLayout:
    """Forward-produced bytes of one step under the recorded techniques (all of the slot but StreamBP)."""

    fixed: int  # token ids, RoPE tables, autocast weight copies
    layer: int  # one layer's saved tensors in full: alive while its backward runs (recomputed or unpacked)
    layers: tuple[LayerPlan, ...]
    head_saved: int  # final norm and loss head, kept for backward
    head_transient: int  # loss-head tensors alive only while forward computes the loss
    head_backward: int  # the loss head's gradients as backward starts
    on_host: bool = False  # saved tensors live in host memory between forward and backward
    layer_casts: int = 0  # one block's weights cast by autocast (kept by a layer that is not recomputed)
    head_casts: int = 0  # the other weights' casts (the LM head's), kept until the head's backward

    def with_layers(self, change) -> ActivationLayout:
        """A copy with `change(i, plan)` applied to every layer's plan."""
        return replace(self, layers=tuple(change(i, p) for i, p in enumerate(self.layers)))

    def activation_peak(self, spec: RunSpec) -> int:
        """Peak bytes of forward-produced tensors: forward ends holding the fixed tensors, what each layer keeps
        and the head's; backward then works on one layer at a time from the top, freeing as it goes."""
        head = self.head_saved + self.head_transient
        casts = self.head_casts + spec.model.n_layers * self.layer_casts  # all in autocast's cache at the loss
        if self.on_host:  # the device holds the head and one layer in flight
            return self.fixed + casts + head + self.layer
        kept = [p.kept(spec) for p in self.layers]
        cache = [p.forward_only for p in self.layers]
        peak = sum(kept) + sum(cache) + head
        for i, plan in enumerate(self.layers):
            peak = max(peak, sum(kept[:i]) + self.layer)
            if plan.packing():
                peak = max(peak, sum(kept[:i + 1]) + sum(cache[:i + 1]) + plan.packing())
        return self.fixed + casts + peak

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        return base.with_(activations=self.activation_peak(spec),
                          temporaries=est.backward_temporaries(spec, head=self.head_backward))

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
        """Forward's loss head, the start of backward (everything kept + the loss head's gradients), each layer's
        backward from the top (layers below still kept, this one recomputed or unpacked, gradients of the head
        and the layers above made, the block's transients), the optimizer step."""
        n = spec.model.n_layers
        fixed = est.fixed_bytes(breakdown) + self.fixed
        # weight casts: all cached while forward computes the loss; then those autograd saved, a recomputed
        # layer's only while its backward runs (none at the optimizer step: autocast's cache is gone), a packed
        # layer's re-stored in what it keeps (and unpacked with the layer for its backward)
        casts = [0 if p.recomputed or p.kept_casts() else self.layer_casts for p in self.layers]
        grads = breakdown.gradients
        held = grads if spec.grad_accum > 1 else 0
        mlp_tmp, attn_tmp = est.block_backward_temporaries(spec)
        parts = est.layer_components(spec)
        # inside one layer's backward (as in plain backprop's phases): the MLP's transients while the layer is
        # whole and only the layers above have their gradients, then the attention's once the MLP's saved tensors
        # and the norms' are freed (the layer's own gradients counted as made)
        in_mlp, in_attn = mlp_tmp - parts["norms"] // 2, attn_tmp - parts["mlp"] - parts["norms"]
        kept = [p.kept(spec) for p in self.layers]
        cache = [p.forward_only for p in self.layers]
        phases = {
            "forward_head": fixed + self.head_casts + n * self.layer_casts + held + sum(kept) + sum(cache)
            + self.head_saved
            + self.head_transient + est.forward_head_held(spec),
            "backward_start": fixed + self.head_casts + sum(casts) + held + sum(kept) + self.head_saved
            + self.head_backward,
            "optimizer_step": est.fixed_bytes(breakdown) + grads + est.optimizer_step_transients(spec, breakdown),
        }
        for i, plan in enumerate(self.layers):
            if plan.packing():  # a layer packing its saved tensors in forward: the casts made so far are cached
                phases[f"layer_{i}_forward"] = (fixed + (i + 1) * self.layer_casts + held + sum(kept[:i + 1])
                                                + sum(cache[:i + 1]) + plan.packing())
        for i in reversed(range(n)):
            below = fixed + sum(casts[:i]) + self.layer_casts + sum(kept[:i]) + self.layer
            phases[f"layer_{i}_mlp"] = below + max(held, est.gradients_made(spec, breakdown, n - 1 - i)) + in_mlp
            phases[f"layer_{i}_attention"] = below + max(held, est.gradients_made(spec, breakdown, n - i)) + in_attn
        return phases


def plain_layout(spec: RunSpec) -> ActivationLayout:
    """Plain backprop: every layer keeps its saved tensors; the loss head keeps its log-probabilities, with the
    logits alive while the loss is computed."""
    layer = layer_bytes(spec)
    head_saved, head_transient = norm_bytes(spec), 0
    if spec.task == "causal_lm":
        loss = est.head_components(spec)["loss"]
        head_saved += loss
        head_transient = logits_bytes(spec) - loss
    head_casts, layer_casts = est.weight_cast_split(spec)
    return ActivationLayout(ids_bytes(spec) + rope_bytes(spec), layer, (LayerPlan(saved=layer),) * spec.model.n_layers,
                            head_saved, head_transient, est.head_backward_temporaries(spec),
                            layer_casts=layer_casts, head_casts=head_casts)


# --- the techniques that shape it --------------------------------------------------------------------------

RECORD_KEY = "activation_layout"
"""`spec.extra` key: the activation techniques that shape the layout, in the recipe's order."""


class LayoutTechnique(Technique):
    """An activation technique that changes what forward keeps: it records itself in the spec, reshapes the
    layout in `shape_layout`, and estimates (activations, the loss head's temporaries) and models the step's
    phases from the composed layout."""

    slot = "activations"

    def shape_layout(self, spec: RunSpec, layout: ActivationLayout) -> ActivationLayout:
        return layout

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        return spec.with_(extra={**spec.extra, RECORD_KEY: (*spec.extra.get(RECORD_KEY, ()), self)})

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        return layout_of(spec).estimate(spec, base)

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
        return layout_of(spec).step_phases(spec, breakdown)


def layout_of(spec: RunSpec) -> ActivationLayout:
    """The plain layout reshaped by every recorded technique."""
    return reduce(lambda lay, t: t.shape_layout(spec, lay), spec.extra.get(RECORD_KEY, ()), plain_layout(spec))
