"""Analytic memory estimates for the baseline run (dense weights, full backprop, no optimizer).

`estimate_step(spec, techniques)` composes: each technique may change the shapes (`transform_spec`), then the
baseline breakdown is computed, then each technique replaces its own categories (`estimate`) and may model the
step's phases its own way (`step_phases`). This module knows no technique: it composes any `EstimatePart`.

Activations are modelled tensor by tensor from what autograd saves for backward in the `transformers`
implementations, one block family per file in `memory/arch/` (read off `torch.autograd.graph.saved_tensors_hooks`;
see `docs/architecture.md`, "Memory model"). The numbers are what `MemoryMeter` reports as *activations* once the
forward has returned the loss: saved tensors plus the loss itself (the logits are dropped by the loss function
unless `spec.extra["keep_logits"]`).

Facts a `RunSpec` does not carry are read from `spec.extra` with these defaults:

- `device`: "cpu". On CPU a dropout mask has the dtype of its input and SDPA with dropout (BERT in training)
  falls back to the math kernel that saves the (B, H, S, S) probabilities; on CUDA masks are 1-byte bools and
  SDPA's fused kernels save only q, k, v, the output and the log-sum-exp (CUDA rules are not measured here).
- `attn_dropout` / `hidden_dropout`: the config's (read into `spec.model.arch`); for a hand-written shape 0.1 for
  BERT, 0.0 for Llama.
- `keep_logits`: False (the run loop's loss function returns only the loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from memfit.memory.arch import family_of, in_block, is_embedding
from memfit.memory.arch.flow import block_path, flow_of
from memfit.memory.arch.parts import (F32, I64, Dtypes, attention_core_bytes, dtypes,  # noqa: F401 - public API
                                     tied_head_gradient)
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec, cast_trainable


def parameter_bytes(spec: RunSpec) -> int:
    return sum(p.nbytes for p in spec.model.params)


def gradient_bytes(spec: RunSpec) -> int:
    """One gradient per trainable parameter, in the parameter's dtype."""
    return sum(p.nbytes for p in spec.model.trainable)


# --- activations ------------------------------------------------------------------------------------------


def _linear_weight_numel(spec: RunSpec) -> int:
    """Elements of every dense matmul weight (2-D, not an embedding table, not a quantized weight's codes or
    scales), tied LM head included; in a partly frozen model a frozen weight only where its input needs a
    gradient (a weight that neither trains nor passes a gradient on is not saved)."""
    m = spec.model
    flow = flow_of(spec)
    family = None if flow.full else family_of(m)
    n = 0
    for p in m.params:
        if len(p.shape) != 2 or p.quantized or is_embedding(m, p.name):
            continue
        where = None if family is None or p.trainable else block_path(m, p.name)
        # a trained weight's cast stays in autocast's cache through the forward; a frozen one's is saved only
        # when its input's gradient needs it
        if where is not None and where[0] < len(flow.blocks):
            if not family.input_grad(flow.blocks[where[0]], where[1].rpartition(".")[0]):
                continue
        n += p.numel
    if m.tie_embeddings and spec.task == "causal_lm":
        n += m.vocab * m.hidden
    return n


def weight_cast_split(spec: RunSpec) -> tuple[int, int]:
    """(Casts of the weights outside the blocks — the LM head's —, mean casts of one block) under autocast."""
    total = weight_cast_bytes(spec)
    if not total or not spec.model.n_layers:
        return total, 0
    d, m = dtypes(spec), spec.model
    blocks = sum(p.numel for p in m.params if len(p.shape) == 2 and not p.quantized and in_block(m, p.name)
                 and not is_embedding(m, p.name)) * d.compute
    blocks = min(blocks, total)
    return total - blocks, blocks // m.n_layers


def weight_cast_bytes(spec: RunSpec) -> int:
    """Under autocast every matmul weight is cast once per forward and the copy is saved for backward."""
    d = dtypes(spec)
    return _linear_weight_numel(spec) * d.compute if d.autocast else 0


def layer_components(spec: RunSpec) -> dict[str, int]:
    """Bytes one transformer block saves for backward, by part: `attention`, `mlp`, `norms` (the block family's
    formulas, `memory/arch/`)."""
    return family_of(spec.model).layer(spec)


def head_components(spec: RunSpec) -> dict[str, int]:
    """Bytes saved outside the blocks: `embeddings`, `final_norm`, `head` (LM head / pooler / classifier
    inputs), `loss` (fp32 log-probabilities, targets, scalars) and `logits` (only if the caller keeps them).
    In a partly frozen model, what the frozen parts still save (`arch/flow.py`)."""
    family, flow = family_of(spec.model), flow_of(spec)
    return family.head(spec) if flow.full else family.head_with(spec, flow)


def trained_head_components(spec: RunSpec) -> dict[str, int]:
    """`head_components` as if every parameter trained (for a technique that accounts for its frozen head itself)."""
    return family_of(spec.model).head(spec)


def block_components(spec: RunSpec, index: int) -> dict[str, int]:
    """What block `index` saves for backward, by part: `layer_components` unless part of the model is frozen,
    then what that block saves given where gradients flow (nothing in a block below every trained weight; a frozen
    weight's op keeps only what its input's gradient needs)."""
    flow = flow_of(spec)
    if flow.full:
        return layer_components(spec)
    return family_of(spec.model).layer_with(spec, flow.blocks[index])


def activation_components(spec: RunSpec) -> dict[str, int]:
    """Bytes saved for backward by one forward, by named component (all layers summed):
    `attention`, `mlp`, `norms`, `embeddings`, `final_norm`, `head`, `loss`, `logits`, `weight_casts`."""
    n = spec.model.n_layers
    if flow_of(spec).full:
        out = {k: n * v for k, v in layer_components(spec).items()}
    else:
        out = {}
        for i in range(n):
            for k, v in block_components(spec, i).items():
                out[k] = out.get(k, 0) + v
    out.update(head_components(spec))
    out["weight_casts"] = weight_cast_bytes(spec)
    return out


def activation_bytes(spec: RunSpec) -> int:
    """Bytes saved for backward by one forward pass (what the meter reports as activations after it)."""
    return sum(activation_components(spec).values())


# --- backward transients and the step peak ------------------------------------------------------------------

_SPLITS: dict[tuple, tuple[object, tuple[int, int]]] = {}


def gradient_split(spec: RunSpec) -> tuple[int, int]:
    """(gradient bytes of the parts after the last block — LM head, final norm, pooler, classifier —,
    mean gradient bytes of one block); memoised by the identity of the parameter tuple, as `flow_of`."""
    m = spec.model
    key = (id(m.params), id(m.arch), m.n_layers)
    hit = _SPLITS.get(key)
    if hit is None or hit[0][0] is not m.params or hit[0][1] is not m.arch:
        head = layers = 0
        for p in m.trainable:
            if in_block(m, p.name):
                layers += p.nbytes
            elif not is_embedding(m, p.name):
                head += p.nbytes
        if len(_SPLITS) >= 256:
            _SPLITS.clear()
        hit = _SPLITS[key] = ((m.params, m.arch), (head, layers // max(m.n_layers, 1)))
    return hit[1]


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
    largest trainable parameter's size, when there is optimizer state (measured for torch's AdamW on CPU). An
    optimizer that works otherwise states its own in `spec.extra["optimizer_step_transients"]` (its
    `transform_spec`; e.g. 8-bit AdamW's per-chunk dequantized moments)."""
    if not breakdown.optimizer:
        return 0
    if "optimizer_step_transients" in spec.extra:
        return int(spec.extra["optimizer_step_transients"])
    return 2 * max((p.nbytes for p in spec.model.trainable), default=0)


def gradients_made(spec: RunSpec, breakdown: MemoryBreakdown, layers_done: int) -> int:
    """Gradient bytes alive once backward has passed the head and `layers_done` blocks, capped by the breakdown's
    gradients (0 when a technique removed them; one parameter's under a layer-wise optimizer)."""
    g_head, g_layer = gradient_split(spec)
    return min(breakdown.gradients, g_head + layers_done * g_layer)


def block_backward_temporaries(spec: RunSpec) -> tuple[int, int]:
    """(MLP, attention) transients inside one block's backward: gradients of the hidden activations, and of
    the (B, H, S, S) scores where the probabilities are stored (eager, or SDPA's math fallback)."""
    return family_of(spec.model).temporaries(spec)


def backward_temporaries(spec: RunSpec, head: int | None = None) -> int:
    """Largest set of tensors alive at once inside backward besides saved activations and gradients
    (what the meter's `temporaries` category peaks at): the loss head's two B·S·V fp32 gradients for a causal
    LM, a block's hidden / attention-score gradients, or the embedding table's gradient, whichever is larger.
    `head`: the loss head's backward transients when a technique computes the loss its own way (chunked CE)."""
    mlp, attn = block_backward_temporaries(spec)
    head = head_backward_temporaries(spec) if head is None else head
    return max(head, mlp, attn, embedding_gradient_bytes(spec))


def embedding_gradient_bytes(spec: RunSpec) -> int:
    """The embedding backward builds a dense gradient of the whole table before it lands in `.grad`; a table
    tied to the LM head is summed with the head's held gradient into a third table-sized tensor."""
    tables = [p.nbytes for p in spec.model.trainable if is_embedding(spec.model, p.name)]
    return max(max(tables, default=0), 3 * tied_head_gradient(spec))


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
    layer = block_components(spec, m.n_layers - 1) if m.n_layers else layer_components(spec)
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
        phases["forward_head"] = fixed + held + acts - comp.get("logits", 0) + logits + forward_head_held(spec)
    return phases


def forward_head_held(spec: RunSpec) -> int:
    """Tensors alive while a causal LM's loss is computed that backward does not keep: the final norm's output
    (the LM head's input) unless it is the tensor the head saves (no autocast, a trained head), the labels padded
    before they are shifted, and what the model's output holds besides (`Family.output_held`: the KV cache)."""
    if spec.task != "causal_lm":
        return 0
    d, m = dtypes(spec), spec.model
    normed = spec.tokens * m.hidden * d.residual
    saved = head_components(spec).get("head", 0) if not d.autocast else 0
    return max(normed - saved, 0) + spec.batch * (spec.seq + 1) * I64 + family_of(m).output_held(spec)


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
    categories; the step peak is taken on the transformed spec. What trains is stored in the precision's storage
    dtype (`cast_trainable`, as the build does once techniques have applied)."""
    ordered = sorted(parts, key=lambda p: p.order)
    for part in ordered:
        spec = part.transform_spec(spec)
    spec = cast_trainable(spec)
    breakdown = baseline(spec)
    for part in ordered:
        breakdown = part.estimate(spec, breakdown)
    return breakdown, step_peak(spec, breakdown, ordered)
