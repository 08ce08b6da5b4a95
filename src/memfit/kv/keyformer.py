"""Keyformer: keep a recent window plus "key tokens" ranked by a Gumbel-noised, tempered attention score.

Adnan, Arunkumar, Jain, Nair, Soloveychik, Kamath (2024). "Keyformer: KV Cache Reduction through Key Tokens
Selection for Efficient Generative Inference". MLSys 2024.

Removing tokens skews the softmax over those that remain; Keyformer scores tokens with a Gumbel-softmax instead of the
plain softmax: f(x_i) = exp((x_i + ζ_i)/τ) / Σ_j exp((x_j + ζ_j)/τ), ζ ~ Gumbel(0, 1), with the temperature τ rising
linearly from `tau_init` to `tau_end` over `tau_steps` forward steps, accumulated over steps like H2O. The logits x are
recovered from the eager attention probabilities as log p (the per-row constant cancels in the softmax). The paper
keeps quality with 50 % of the cache (recent window 30 % of it) on GPT-J, Cerebras-GPT and MPT.
"""

from __future__ import annotations

import torch
from pydantic import Field

from memfit.kv.accumulated import AccumulatedConfig, AccumulatedScoreLayer, AccumulatedScorePolicy
from memfit.kv.base import PolicyLayer
from memfit.kv.quantized_slots import QuantizedScoreLayer


class KeyformerConfig(AccumulatedConfig):
    name: str = "keyformer"
    recent_ratio: float = Field(0.3, ge=0, le=1, description="share of the budget kept for the most recent tokens")
    tau_init: float = Field(1.0, gt=0)
    tau_end: float = Field(2.0, gt=0)
    tau_steps: int = Field(256, gt=0, description="forward steps over which tau rises from tau_init to tau_end")
    seed: int = 0


class KeyformerLayer(AccumulatedScoreLayer):
    def __init__(self, budget: int, recent: int, tau_init: float, tau_end: float, tau_steps: int,
                 seed: int) -> None:
        super().__init__(budget, recent)
        self.tau_init, self.tau_end, self.tau_steps = tau_init, tau_end, tau_steps
        self.seed = seed
        self.steps = 0
        self.generator: torch.Generator | None = None

    def row_scores(self, probs: torch.Tensor) -> torch.Tensor:
        if self.generator is None or self.generator.device != probs.device:
            self.generator = torch.Generator(device=probs.device).manual_seed(self.seed)
        tau = self.tau_init + (self.tau_end - self.tau_init) * min(1.0, self.steps / self.tau_steps)
        self.steps += 1
        # Gumbel noise is ζ = -log E with E = -log U ~ Exp(1), so (log p + ζ) / τ = log(p / E) / τ: one logarithm
        # fewer than log p - log(-log U), all in place (decode speed, issue 15; `exponential_` is 3× slower than
        # `rand` + `log_` on CPU). log p = -inf where masked, which keeps a zero score.
        exp_noise = torch.rand(probs.shape, generator=self.generator, device=probs.device).log_().neg_()
        return torch.softmax(probs.div(exp_noise.clamp_min_(1e-10)).log_().div_(tau), dim=-1)

    def share_scoring(self, others) -> None:
        for layer in others:
            layer.steps = self.steps

    def reset_stats(self) -> None:
        super().reset_stats()
        self.steps = 0
        self.generator = None


class QuantizedKeyformerLayer(QuantizedScoreLayer, KeyformerLayer):
    """Keyformer's scores, KIVI-quantized storage (`memfit.kv.quantized_slots`)."""


class Keyformer(AccumulatedScorePolicy):
    """Recent window + key tokens by accumulated Gumbel-softmax score; `budget` tokens per layer and head."""

    name = "keyformer"
    Config = KeyformerConfig
    score_copies = 3  # the exponential noise, p / noise (logged and scaled in place), the softmax

    def make_layer(self, layer_idx: int, n_layers: int) -> PolicyLayer:
        c = self.config
        return self.scored_layer(KeyformerLayer, QuantizedKeyformerLayer, tau_init=c.tau_init, tau_end=c.tau_end,
                                 tau_steps=c.tau_steps, seed=c.seed + layer_idx)
