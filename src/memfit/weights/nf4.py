"""NF4 weights with double-quantized constants, as the frozen base of QLoRA.

Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs": 4-bit NormalFloat
(quantiles of N(0,1), block-wise absmax, block 64) and Double Quantization of the absmax constants (block 256).
The code book and block layout match bitsandbytes' `quantize_4bit(quant_type="nf4")` code for code (tested); the
second-level constants are int8 absmax per 256 blocks after subtracting their mean (the paper uses FP8; same
bytes). 0.5 + 1/64 + 4/(64·256) ≈ 0.516 bytes per parameter.
"""

from __future__ import annotations

from memfit.weights.base import WeightQuantTechnique


class NF4Weights(WeightQuantTechnique):
    name = "nf4"
    fmt = "nf4"
