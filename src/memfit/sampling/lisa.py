"""LISA — Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
Fine-Tuning".

Every K steps (`interval`), γ (`layers`) of the transformer layers are sampled uniformly to train; embeddings,
norms and the head always train. Deactivated layers lose their gradients *and optimizer state* (see
`memfit.sampling.layers`); `free_state: false` reproduces LMFlow's behaviour for comparison.
Recipe: `adapter: {name: lisa, layers: 2, interval: 20}`.
"""

from __future__ import annotations

import torch

from memfit.sampling.layers import LayerSampler, seeded_generator


class LISA(LayerSampler):
    name = "lisa"
    plan_options = ({},)
    needs_pretrained = True

    def select(self, k: int, n_layers: int) -> list[int]:
        perm = torch.randperm(n_layers, generator=seeded_generator(self.seed, k))
        return sorted(perm[: self.config.layers].tolist())
