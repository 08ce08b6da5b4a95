"""int4 group-wise weight-only quantization: asymmetric min/max per group of input columns, packed nibbles.

Dettmers & Zettlemoyer 2023, "The case for 4-bit precision: k-bit Inference Scaling Laws" (small block sizes make
4-bit the bit-optimal choice); the group-wise asymmetric grid (scale + zero point) is the one GPTQ (Frantar et al.
2023) and AWQ (Lin et al. 2024) store. Bound: |W − Ŵ| ≤ s/2 per group. 0.5 + 3/group_size bytes per parameter.
"""

from __future__ import annotations

from memfit.weights.base import WeightQuantTechnique


class Int4Weights(WeightQuantTechnique):
    name = "int4"
    fmt = "int4"
