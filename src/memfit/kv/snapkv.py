"""SnapKV: each head keeps the prompt tokens its most recent queries (the observation window) attend to.

Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen (2024). "SnapKV: LLM Knows What You Are Looking for
Before Generation". NeurIPS 2024.

Scores are the attention the last `window` queries paid each token, summed over the window and the query heads of a
KV head, then max-pooled (kernel `kernel`) so that clusters of neighbouring tokens survive together; each head keeps
the window plus its top `budget - window` tokens. The paper compresses the prompt once; memfit applies the same rule
after every forward (the window slides with the newest queries), so chunked prefill and long generations stay within
`budget` tokens per layer and head. The paper reports LongBench quality close to the full cache with 1024-4096
entries for 16k+ token prompts. Needs attention probabilities, so the model must run with eager attention.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from memfit.kv.base import BudgetConfig, KVPolicy, ObservationWindowLayer, PolicyLayer, window_bytes


class SnapKVConfig(BudgetConfig):
    name: str = "snapkv"
    window: int = Field(16, gt=0, description="observation window: the most recent queries whose attention ranks")
    kernel: int = Field(7, gt=0, description="pooling kernel over neighbouring tokens (odd; 1 = no pooling)")
    pooling: Literal["max", "avg"] = "max"

    @model_validator(mode="after")
    def _window_fits(self):
        if self.window >= self.budget:
            raise ValueError(f"window ({self.window}) must be smaller than budget ({self.budget}); lower --window "
                             "or raise the budget")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd, got {self.kernel}")
        return self


class SnapKV(KVPolicy):
    """Observation-window attention, pooled; `budget` tokens per layer and head."""

    name = "snapkv"
    Config = SnapKVConfig
    needs_attention = True

    def make_layer(self, layer_idx: int, n_layers: int) -> PolicyLayer:
        c = self.config
        return ObservationWindowLayer(self.budget_of(layer_idx, n_layers), c.window, c.kernel, c.pooling)

    def layer_bytes(self, layer_idx, n_layers, tokens, batch, kv_heads, head_dim, elem) -> int:
        return window_bytes(tokens, self.budget_of(layer_idx, n_layers), self.config.window, batch, kv_heads,
                            head_dim, elem)
