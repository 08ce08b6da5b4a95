"""BAdam — Luo et al. 2024, "BAdam: A Memory Efficient Full Parameter Optimization Method for Large Language
Models".

Block-coordinate descent: the transformer layers are blocks; one block trains for `interval` steps (K Adam
steps), then the next (order: descending, as BAdam's default, ascending, or a random permutation per sweep);
Adam's state restarts whenever a block is switched in. Embeddings, norms and the LM head stay frozen (BAdam's
default); a classification head trains throughout. Parity with the `badam` package is tested.
BAdam's fp32 master copy of the active block for a bf16 model is not reproduced: train in fp32 or bf16 directly.
Recipe: `adapter: {name: badam, interval: 50, order: descending}`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from memfit.sampling.layers import LayerSampler, seeded_generator
from memfit.techniques.base import TechniqueConfig


class BAdamConfig(TechniqueConfig):
    interval: int = Field(50, ge=1, description="Adam steps per block before switching (K)")
    order: Literal["descending", "ascending", "random"] = "descending"


class BAdam(LayerSampler):
    name = "badam"
    Config = BAdamConfig
    outside = "cls_head"

    def n_active(self, n_layers: int) -> int:
        return 1

    def select(self, k: int, n_layers: int) -> list[int]:
        order = self.config.order
        if order == "ascending":
            return [k % n_layers]
        if order == "descending":
            return [(n_layers - 1 - k) % n_layers]
        sweep = torch.randperm(n_layers, generator=seeded_generator(self.seed, k // n_layers)).tolist()
        return [sweep[k % n_layers]]
