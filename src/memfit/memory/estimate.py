"""Analytic memory estimates for the baseline run (dense weights, full backprop, no optimizer).

`estimate_run(spec, techniques)` composes: each technique may change the shapes (`transform_spec`), then the
baseline breakdown is computed, then each technique replaces its own categories (`estimate`).
"""

from __future__ import annotations

from collections.abc import Sequence

from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import DTYPE_BYTES, RunSpec

ESTIMATE_ORDER = ("weights", "adapter", "activations", "step", "optimizer", "kv")
"""Slots are applied in this order, so e.g. the optimizer sees the adapter's trainable parameters."""


def parameter_bytes(spec: RunSpec) -> int:
    return sum(p.nbytes for p in spec.model.params)


def gradient_bytes(spec: RunSpec) -> int:
    """One gradient per trainable parameter, in the parameter's dtype."""
    return sum(p.nbytes for p in spec.model.trainable)


def activation_bytes(spec: RunSpec) -> int:
    """Bytes saved for backward by one forward pass (placeholder model; refined per family)."""
    m = spec.model
    b = DTYPE_BYTES[spec.compute_dtype]
    tokens = spec.tokens
    per_layer = tokens * (10 * m.hidden + 4 * m.intermediate) * b
    if spec.attn_impl == "eager":
        per_layer += 2 * spec.batch * m.n_heads * spec.seq * spec.seq * b
    head = 2 * tokens * (m.vocab if spec.task == "causal_lm" else m.hidden) * 4
    return m.n_layers * per_layer + head


def baseline(spec: RunSpec) -> MemoryBreakdown:
    """Dense weights, full backprop, no optimizer state."""
    return MemoryBreakdown(
        parameters=parameter_bytes(spec),
        buffers=spec.model.buffers_bytes,
        gradients=gradient_bytes(spec),
        activations=activation_bytes(spec),
    )


def estimate_run(spec: RunSpec, techniques: Sequence) -> MemoryBreakdown:
    """Predicted peak by category for a run of `spec` with `techniques` applied."""
    ordered = sorted(techniques, key=lambda t: ESTIMATE_ORDER.index(t.slot))
    for t in ordered:
        spec = t.transform_spec(spec)
    breakdown = baseline(spec)
    for t in ordered:
        breakdown = t.estimate(spec, breakdown)
    return breakdown
