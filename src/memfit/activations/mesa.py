"""Mesa — Pan, Chen, Zhuang, Li, Pfister & Tan 2021, "Mesa: A Memory-saving Training Framework for Transformers".

Forward runs in full precision; the tensors each decoder layer saves for backward are stored as 8-bit codes
with a per-channel (per-head for attention tensors) scale and offset, and dequantized when backward needs them.
Error bound (stated and tested): every dequantized element is within half a quantization step of the exact
value, |x̂ − x| ≤ (max_c − min_c) / (2 · 255) for its channel c — 0.2 % of the channel's range. Gradients are
therefore approximate (tests bound their relative error and check that training still lowers the loss).

    activations: [{name: mesa}]
"""

from __future__ import annotations

from memfit.activations._compressed import CompressedActivations


class Mesa(CompressedActivations):
    name = "mesa"
    bits = 8
