"""Analytic memory estimates for the baseline run (dense weights, full backprop, no optimizer).

`estimate_step(spec, techniques)` composes: each technique may change the shapes (`transform_spec`), then the
baseline breakdown is computed, then each technique replaces its own categories (`estimate`) and may model the
step's phases its own way (`step_phases`). This module knows no technique: it composes any `EstimatePart`.

Activations are modelled tensor by tensor from what autograd saves for backward in the `transformers`
implementations of the two shipped families (read off `torch.autograd.graph.saved_tensors_hooks`; see
`docs/architecture.md`, "Memory model"). The numbers are what `MemoryMeter` reports as *activations* once the
forward has returned the loss: saved tensors plus the loss itself (the logits are dropped by the loss function
unless `spec.extra["keep_logits"]`).

Facts a `RunSpec` does not carry are read from `spec.extra` with these defaults:

- `device`: "cpu". On CPU a dropout mask has the dtype of its input and SDPA with dropout (BERT in training)
  falls back to the math kernel that saves the (B, H, S, S) probabilities; on CUDA masks are 1-byte bools and
  SDPA's fused kernels save only q, k, v, the output and the log-sum-exp (CUDA rules are not measured here).
- `attn_dropout` / `hidden_dropout`: 0.1 for BERT, 0.0 for Llama (the configs' defaults).
- `keep_logits`: False (the run loop's loss function returns only the loss).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import DTYPE_BYTES, RunSpec

F32 = 4
I64 = 8
_EMBEDDING_NAMES = ("embed", "embeddings", "wte", "wpe")


def parameter_bytes(spec: RunSpec) -> int:
    return sum(p.nbytes for p in spec.model.params)


def gradient_bytes(spec: RunSpec) -> int:
    """One gradient per trainable parameter, in the parameter's dtype."""
    return sum(p.nbytes for p in spec.model.trainable)


# --- activations ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the tensors a forward saves, for one run.

    `compute`: outputs of matmuls (the autocast dtype, else the parameter dtype); `residual`: the residual
    stream and norm inputs (the parameter dtype: autocast does not lower it); `autocast`: whether inputs and
    weights are cast per op (each cast copy a matmul uses is saved); `device`: "cpu" or "cuda".
    """

    compute: int
    residual: int
    autocast: bool
    device: str

    def mask(self, input_bytes: int) -> int:
        """A dropout mask: input's dtype on CPU (`input * noise`), 1-byte bool on CUDA (`native_dropout`)."""
        return 1 if self.device == "cuda" else input_bytes


def dtypes(spec: RunSpec) -> Dtypes:
    compute = DTYPE_BYTES[spec.compute_dtype]
    residual = DTYPE_BYTES.get(spec.param_dtype, F32)
    if spec.param_dtype in ("int8",):  # quantized base weights dequantize to the compute dtype
        residual = compute
    autocast = spec.compute_dtype != spec.param_dtype and compute < residual
    device = str(spec.extra.get("device", "cpu")).split(":")[0]
    return Dtypes(compute=compute, residual=residual, autocast=autocast, device=device)


def _dropouts(spec: RunSpec) -> tuple[float, float]:
    default = 0.1 if spec.model.family == "bert" else 0.0
    return float(spec.extra.get("attn_dropout", default)), float(spec.extra.get("hidden_dropout", default))


def _linear_weight_numel(spec: RunSpec) -> int:
    """Elements of every matmul weight (2-D, not an embedding table), tied LM head included."""
    m = spec.model
    n = sum(p.numel for p in m.params if len(p.shape) == 2 and not any(k in p.name for k in _EMBEDDING_NAMES))
    if m.tie_embeddings and spec.task == "causal_lm":
        n += m.vocab * m.hidden
    return n


def weight_cast_bytes(spec: RunSpec) -> int:
    """Under autocast every matmul weight is cast once per forward and the copy is saved for backward."""
    d = dtypes(spec)
    return _linear_weight_numel(spec) * d.compute if d.autocast else 0


def attention_core_bytes(spec: RunSpec, tokens: int | None = None, seq: int | None = None) -> int:
    """What one attention layer's score/softmax/value part saves (q, k, v after projection onward), excluding
    the projections' input. `tokens`/`seq` let chunked techniques ask for a slice (tokens = batch·seq)."""
    m, d = spec.model, dtypes(spec)
    s = spec.seq if seq is None else seq
    t = spec.tokens if tokens is None else tokens
    batch = t // s if s else 0
    c = d.compute
    q_dim, kv_dim = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    scores = batch * m.n_heads * s * s
    attn_dropout, _ = _dropouts(spec)
    fused = spec.attn_impl != "eager" and (attn_dropout == 0.0 or d.device == "cuda")
    if fused:  # flash / memory-efficient SDPA: q, k, v, output, log-sum-exp (fp32); k, v stay at kv heads
        return t * (2 * q_dim + 2 * kv_dim) * c + batch * m.n_heads * s * F32
    if spec.attn_impl != "eager":  # SDPA math fallback (CPU with dropout): upcasts to fp32 on CPU
        e = F32 if d.device == "cpu" else c
        return 3 * t * q_dim * e + scores * (e + d.mask(e) + e) + t * q_dim * c
    # eager: k and v repeated to all heads (GQA), fp32 softmax, its low-precision copy for the PV matmul,
    # dropout mask and dropped probabilities where dropout is on, then the re-laid-out output for o_proj
    probs = scores * F32
    if attn_dropout > 0:
        probs += scores * d.mask(F32) + scores * c
    elif c != F32:
        probs += scores * c
    return 3 * t * q_dim * c + probs + t * q_dim * c


def _rmsnorm(tokens: int, hidden: int, d: Dtypes) -> int:
    # x (or its fp32 copy) for pow, rsqrt per token, normalized x for the weight multiply
    return tokens * hidden * F32 + tokens * F32 + tokens * hidden * d.residual


def _layernorm(tokens: int, hidden: int, d: Dtypes) -> int:
    return tokens * hidden * d.residual + 2 * tokens * F32  # input, mean, rstd


def _matmul_inputs(tokens: int, hidden: int, uses: int, d: Dtypes) -> int:
    """Input saved by `uses` projections of one tensor: one shared tensor, or one cast copy per use."""
    return tokens * hidden * (uses * d.compute if d.autocast else d.residual)


def layer_components(spec: RunSpec) -> dict[str, int]:
    """Bytes one transformer block saves for backward, by part: `attention`, `mlp`, `norms`."""
    m, d, t = spec.model, dtypes(spec), spec.tokens
    c = d.compute
    if m.family == "llama":
        attention = _matmul_inputs(t, m.hidden, 3, d) + attention_core_bytes(spec)
        mlp = _matmul_inputs(t, m.hidden, 2, d) + 4 * t * m.intermediate * c  # silu in/out, up, product
        norms = 2 * _rmsnorm(t, m.hidden, d)
        return {"attention": attention, "mlp": mlp, "norms": norms}
    if m.family == "bert":
        _, hidden_dropout = _dropouts(spec)
        drop = t * m.hidden * d.mask(c) if hidden_dropout > 0 else 0
        attention = _matmul_inputs(t, m.hidden, 3, d) + attention_core_bytes(spec) + drop
        mlp = _matmul_inputs(t, m.hidden, 1, d) + 2 * t * m.intermediate * c + drop  # gelu in, out
        norms = 2 * _layernorm(t, m.hidden, d)
        return {"attention": attention, "mlp": mlp, "norms": norms}
    # unknown architecture: a generic pre-norm block (documented as approximate)
    attention = t * 4 * m.hidden * c + attention_core_bytes(spec)
    return {"attention": attention, "mlp": t * (m.hidden + 3 * m.intermediate) * c,
            "norms": 2 * t * m.hidden * d.residual}


def head_components(spec: RunSpec) -> dict[str, int]:
    """Bytes saved outside the blocks: `embeddings`, `final_norm`, `head` (LM head / pooler / classifier
    inputs), `loss` (fp32 log-probabilities, targets, scalars) and `logits` (only if the caller keeps them)."""
    m, d, t = spec.model, dtypes(spec), spec.tokens
    c = d.compute
    keep_logits = bool(spec.extra.get("keep_logits", False))
    out: dict[str, int] = {}
    if m.family == "llama" or (m.family == "other" and spec.task == "causal_lm"):
        out["embeddings"] = 2 * spec.seq * m.head_dim * d.residual  # rotary cos/sin, shared by all layers
        out["final_norm"] = _rmsnorm(t, m.hidden, d)
        out["head"] = _matmul_inputs(t, m.hidden, 1, d)
        out["loss"] = t * m.vocab * F32 + t * I64 + 2 * F32  # log_softmax output, shifted labels, scalars
        out["logits"] = t * m.vocab * c if keep_logits else 0
        return out
    labels = max(m.num_labels, 1)
    _, hidden_dropout = _dropouts(spec)
    r = d.residual
    # LayerNorm input, dropout mask, and the token-type ids gathered from the buffer (int64, one row)
    out["embeddings"] = (_layernorm(t, m.hidden, d) + (t * m.hidden * d.mask(r) if hidden_dropout > 0 else 0)
                         + spec.seq * I64)
    out["final_norm"] = 0
    if spec.task == "seq_cls":
        b = spec.batch
        # pooler input: the [CLS] slice is a view, so fp32 keeps the whole last hidden state alive
        pooler_in = b * m.hidden * c if d.autocast else t * m.hidden * r
        drop = b * m.hidden * d.mask(c) if hidden_dropout > 0 else 0
        out["head"] = pooler_in + b * m.hidden * c + drop + b * m.hidden * c  # tanh out, mask, classifier in
        out["loss"] = b * labels * F32 + b * I64 + 2 * F32  # log-probs, flattened labels, scalars
        out["logits"] = b * labels * c if keep_logits else 0
    else:  # token classification
        drop = t * m.hidden * d.mask(r) if hidden_dropout > 0 else 0
        out["head"] = drop + _matmul_inputs(t, m.hidden, 1, d)
        out["loss"] = t * labels * F32 + t * I64 + 2 * F32
        out["logits"] = t * labels * c if keep_logits else 0
    return out


def activation_components(spec: RunSpec) -> dict[str, int]:
    """Bytes saved for backward by one forward, by named component (all layers summed):
    `attention`, `mlp`, `norms`, `embeddings`, `final_norm`, `head`, `loss`, `logits`, `weight_casts`."""
    layer = layer_components(spec)
    out = {k: spec.model.n_layers * v for k, v in layer.items()}
    out.update(head_components(spec))
    out["weight_casts"] = weight_cast_bytes(spec)
    return out


def activation_bytes(spec: RunSpec) -> int:
    """Bytes saved for backward by one forward pass (what the meter reports as activations after it)."""
    return sum(activation_components(spec).values())


# --- backward transients and the step peak ------------------------------------------------------------------

_LAYER_RE = re.compile(r"\.layers?\.\d+\.")


def gradient_split(spec: RunSpec) -> tuple[int, int]:
    """(gradient bytes of the parts after the last block — LM head, final norm, pooler, classifier —,
    mean gradient bytes of one block)."""
    head = layers = 0
    for p in spec.model.trainable:
        if _LAYER_RE.search(f".{p.name}"):
            layers += p.nbytes
        elif not any(k in p.name for k in _EMBEDDING_NAMES):
            head += p.nbytes
    return head, layers // max(spec.model.n_layers, 1)


def head_backward_temporaries(spec: RunSpec, tokens: int | None = None) -> int:
    """Gradients of the fp32 log-probabilities and of the logits, alive together as backward starts (for
    `tokens` of a causal LM's tokens, when a technique runs the head on a slice)."""
    m = spec.model
    if spec.task == "causal_lm":
        return 2 * (spec.tokens if tokens is None else tokens) * m.vocab * F32
    n = spec.batch if spec.task == "seq_cls" else spec.tokens
    return 2 * n * max(m.num_labels, 1) * F32


def optimizer_step_transients(spec: RunSpec, breakdown: MemoryBreakdown) -> int:
    """Tensors an optimizer step makes for one parameter at a time (Adam's denominator and update): two of the
    largest trainable parameter's size, when there is optimizer state (measured for torch's AdamW on CPU)."""
    if not breakdown.optimizer:
        return 0
    return 2 * max((p.nbytes for p in spec.model.trainable), default=0)


def gradients_made(spec: RunSpec, breakdown: MemoryBreakdown, layers_done: int) -> int:
    """Gradient bytes alive once backward has passed the head and `layers_done` blocks, capped by the breakdown's
    gradients (0 when a technique removed them; one parameter's under a layer-wise optimizer)."""
    g_head, g_layer = gradient_split(spec)
    return min(breakdown.gradients, g_head + layers_done * g_layer)


def block_backward_temporaries(spec: RunSpec) -> tuple[int, int]:
    """(MLP, attention) transients inside one block's backward: gradients of the hidden activations, and of
    the (B, H, S, S) scores where the probabilities are stored (eager, or SDPA's math fallback)."""
    m, d, t = spec.model, dtypes(spec), spec.tokens
    c, r = d.compute, d.residual
    mlp_width = 3 if m.family == "llama" else 2
    mlp = t * (mlp_width * m.intermediate * c + m.hidden * r)
    q_dim, kv_dim = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    attn = t * ((2 * q_dim + 2 * kv_dim) * c + m.hidden * r)
    attn_dropout, _ = _dropouts(spec)
    if spec.attn_impl == "eager" or (attn_dropout > 0 and d.device == "cpu"):
        scores = 2 * spec.batch * m.n_heads * spec.seq * spec.seq * F32 + 2 * t * m.hidden * r
        attn = max(attn, scores + (t * m.hidden * c if m.family == "bert" else 0))
    return mlp, attn


def backward_temporaries(spec: RunSpec, head: int | None = None) -> int:
    """Largest set of tensors alive at once inside backward besides saved activations and gradients
    (what the meter's `temporaries` category peaks at): the loss head's two B·S·V fp32 gradients for a causal
    LM, a block's hidden / attention-score gradients, or the embedding table's gradient, whichever is larger.
    `head`: the loss head's backward transients when a technique computes the loss its own way (chunked CE)."""
    mlp, attn = block_backward_temporaries(spec)
    head = head_backward_temporaries(spec) if head is None else head
    return max(head, mlp, attn, embedding_gradient_bytes(spec))


def embedding_gradient_bytes(spec: RunSpec) -> int:
    """The embedding backward builds a dense gradient of the whole table before it lands in `.grad`."""
    tables = [p.nbytes for p in spec.model.trainable if any(k in p.name for k in _EMBEDDING_NAMES)]
    return max(tables, default=0)


def baseline(spec: RunSpec) -> MemoryBreakdown:
    """Dense weights, full backprop, no optimizer state. Each category is that category's peak in a step."""
    return MemoryBreakdown(
        parameters=parameter_bytes(spec),
        buffers=spec.model.buffers_bytes,
        gradients=gradient_bytes(spec),
        activations=activation_bytes(spec),
        temporaries=backward_temporaries(spec),
    )


def fixed_bytes(breakdown: MemoryBreakdown) -> int:
    """Bytes alive throughout a step: weights, buffers, optimizer state, KV cache, other."""
    return breakdown.parameters + breakdown.buffers + breakdown.optimizer + breakdown.kv_cache + breakdown.other


def backprop_phases(spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
    """Predicted tensor total at the moments a plain backprop step can peak, from the per-category estimates.

    Categories do not peak together: activations are largest as backward starts (no gradients yet, since
    the loop frees them with `set_to_none`), gradients when it ends (activations freed). Phases:
    `forward_head` (logits, their fp32 copy and the log-probabilities alive at once), `backward_start`
    (all activations + the loss head's gradients), `top_block_mlp` / `top_block_attention` (the last block's
    backward: head activations freed, head gradients made, the block's transients), `optimizer_step`
    (weights, state, all gradients and the update's per-parameter transients).
    With `grad_accum > 1` the gradients of earlier micro-batches are alive throughout.
    """
    fixed = fixed_bytes(breakdown)
    acts, grads = breakdown.activations, breakdown.gradients
    held = grads if spec.grad_accum > 1 else 0
    comp = activation_components(spec)
    m, d = spec.model, dtypes(spec)
    head_acts = comp.get("loss", 0) + comp.get("logits", 0) + comp.get("head", 0) + comp.get("final_norm", 0)
    layer = layer_components(spec)
    mlp_tmp, attn_tmp = block_backward_temporaries(spec)
    after_head = fixed + acts - head_acts
    phases = {
        "backward_start": fixed + held + acts + head_backward_temporaries(spec),
        "top_block_mlp": (after_head + max(held, gradients_made(spec, breakdown, 0)) - layer["norms"] // 2
                          + mlp_tmp),
        "top_block_attention": (after_head + max(held, gradients_made(spec, breakdown, 1)) - layer["mlp"]
                                - layer["norms"] + attn_tmp),
        "optimizer_step": fixed + grads + optimizer_step_transients(spec, breakdown),
    }
    if spec.task == "causal_lm":
        logits = spec.tokens * m.vocab * (d.compute + (F32 if d.compute != F32 else 0))
        phases["forward_head"] = fixed + held + acts - comp.get("logits", 0) + logits
    return phases


# --- composing the parts of a run ---------------------------------------------------------------------------


class EstimatePart(Protocol):
    """What `estimate_step` composes; every `memfit.techniques.Technique` is one (memory imports no technique).

    `order`: its place in the composition (a technique's slot rank: weights, adapter, activations, step,
    optimizer, kv), so e.g. the optimizer sees the adapter's trainable parameters. `transform_spec` changes the
    shapes the others see; `estimate` returns the breakdown with the part's own categories replaced;
    `step_phases` returns the step's phases where the part changes how a step runs (else None).
    """

    @property
    def order(self) -> int: ...

    def transform_spec(self, spec: RunSpec) -> RunSpec: ...

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown: ...

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int] | None: ...


def step_phases(spec: RunSpec, breakdown: MemoryBreakdown, parts: Sequence[EstimatePart] = ()) -> dict[str, int]:
    """Predicted tensor total at the moments a step can peak: the phases of the last part (in composition order)
    that models the step its own way (checkpointing, StreamBP, ...), else plain backprop's."""
    for part in reversed(parts):
        phases = part.step_phases(spec, breakdown)
        if phases is not None:
            return phases
    return backprop_phases(spec, breakdown)


def step_peak(spec: RunSpec, breakdown: MemoryBreakdown, parts: Sequence[EstimatePart] = ()) -> int:
    """Predicted tensor peak of one training step (the largest of `step_phases`); `breakdown.total`, the sum
    of every category's own peak, is an upper bound."""
    return max(step_phases(spec, breakdown, parts).values())


def estimate_run(spec: RunSpec, parts: Sequence[EstimatePart]) -> MemoryBreakdown:
    """Predicted peak by category for a run of `spec` with `parts` (techniques) applied."""
    return estimate_step(spec, parts)[0]


def estimate_step(spec: RunSpec, parts: Sequence[EstimatePart]) -> tuple[MemoryBreakdown, int]:
    """(Predicted peak by category, predicted tensor peak of one step) for `spec` with `parts` applied: each part
    transforms the spec in order, the baseline is computed on the result, then each part replaces its own
    categories; the step peak is taken on the transformed spec."""
    ordered = sorted(parts, key=lambda p: p.order)
    for part in ordered:
        spec = part.transform_spec(spec)
    breakdown = baseline(spec)
    for part in ordered:
        breakdown = part.estimate(spec, breakdown)
    return breakdown, step_peak(spec, breakdown, ordered)
