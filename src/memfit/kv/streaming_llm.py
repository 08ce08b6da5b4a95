"""StreamingLLM: attention sinks plus a window of recent tokens.

Xiao, Tian, Chen, Han, Lewis (2024). "Efficient Streaming Language Models with Attention Sinks". ICLR 2024.

The first `sinks` tokens soak up attention mass that softmax must put somewhere; keeping them beside the last
`budget - sinks` tokens lets a model generate indefinitely in bounded memory. Eviction is data-independent, so it
works with any attention implementation (sdpa included) and happens as tokens arrive. Positions: keys keep the
rotation of their true position and queries are numbered by the tokens seen (see `memfit.kv.base`), so while the
text fits the window generation equals full-cache generation exactly.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from memfit.kv.base import BudgetConfig, KVPolicy, PolicyLayer, dense_bytes


class StreamingLLMConfig(BudgetConfig):
    name: str = "streaming_llm"
    sinks: int = Field(4, ge=0, description="first tokens always kept (attention sinks)")

    @model_validator(mode="after")
    def _sinks_fit(self):
        if self.sinks >= self.budget:
            raise ValueError(f"sinks ({self.sinks}) must be smaller than budget ({self.budget}) to leave room for "
                             "recent tokens")
        return self


class StreamingLLMLayer(PolicyLayer):
    def __init__(self, budget: int, sinks: int) -> None:
        super().__init__(budget)
        self.sinks = sinks

    def select(self, budget: int) -> torch.Tensor:
        b, h, n = self.keys.shape[0], self.keys.shape[1], self.stored
        keep = torch.cat([torch.arange(self.sinks), torch.arange(n - (budget - self.sinks), n)])
        return keep.to(self.keys.device).expand(b, h, budget)

    def evict(self) -> None:
        if self.stored <= self.budget:
            return
        recent = self.budget - self.sinks
        self.keys = torch.cat([self.keys[:, :, : self.sinks], self.keys[:, :, -recent:]], dim=2)
        self.values = torch.cat([self.values[:, :, : self.sinks], self.values[:, :, -recent:]], dim=2)


class StreamingLLM(KVPolicy):
    """Attention sinks + recent window; `budget` tokens per layer and head."""

    name = "streaming_llm"
    Config = StreamingLLMConfig

    def make_layer(self, layer_idx: int, n_layers: int) -> PolicyLayer:
        return StreamingLLMLayer(self.config.budget, self.config.sinks)

    def layer_bytes(self, layer_idx, n_layers, tokens, batch, kv_heads, head_dim, elem) -> int:
        return dense_bytes(min(tokens, self.config.budget), batch, kv_heads, head_dim, elem)
