"""int8 weight-only quantization: symmetric absmax per output channel (or per group).

Dettmers, Lewis, Belkada & Zettlemoyer 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(vector-wise absmax quantization; memfit keeps the weights in int8 and dequantizes per forward, without the
outlier decomposition). Bound: |W − Ŵ| ≤ s/2 with s = absmax/127 per group. ≈1 byte per parameter.
"""

from __future__ import annotations

from memfit.weights.base import WeightQuantTechnique


class Int8Weights(WeightQuantTechnique):
    name = "int8"
    fmt = "int8"
