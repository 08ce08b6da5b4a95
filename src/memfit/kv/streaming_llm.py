"""StreamingLLM: attention sinks plus a window of recent tokens.

Xiao, Tian, Chen, Han, Lewis (2024). "Efficient Streaming Language Models with Attention Sinks". ICLR 2024.

The first `sinks` tokens soak up attention mass that softmax must put somewhere; keeping them beside the last
`budget - sinks` tokens lets a model generate indefinitely in bounded memory. Eviction is data-independent, so it
works with any attention implementation (sdpa included) and happens as tokens arrive. Positions: keys keep the
rotation of their true position and queries are numbered by the tokens seen (see `memfit.kv.base`), so while the
text fits the window generation equals full-cache generation exactly. Memory: `budget + 1` token slots per layer
and head once full — the extra slot is where the next decoded token is written in place (a ring buffer, no copy of
the cache per token).
"""

from __future__ import annotations

from typing import Any

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
    """Sinks + a ring of recent tokens: once full, `budget + 1` slots (the kept tokens and the slot of the token
    evicted last, `stale`); a decode step writes the new token into that slot in place and the next-oldest recent
    slot becomes stale, so no step copies the cache. A multi-token forward first restores position order."""

    def __init__(self, budget: int, sinks: int) -> None:
        super().__init__(budget)
        self.sinks = sinks
        self.stale: int | None = None

    @property
    def stored(self) -> int:
        return super().stored - (self.stale is not None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[-2] != 1 or self.stale is None:
            self._in_order()
            return super().update(key_states, value_states)
        self.keys.narrow(2, self.stale, 1).copy_(key_states)
        self.values.narrow(2, self.stale, 1).copy_(value_states)
        self.seen += 1
        ring = self.budget + 1 - self.sinks
        self.stale = self.sinks + (self.stale + 1 - self.sinks) % ring
        return self.keys, self.values

    def _in_order(self) -> None:
        """Drop the stale slot and put the recent ring back in position order."""
        if self.stale is None:
            return
        ring = self.budget + 1 - self.sinks
        start = self.stale - self.sinks + 1
        order = [*range(self.sinks), *(self.sinks + (start + i) % ring for i in range(ring - 1))]
        idx = torch.tensor(order, device=self.keys.device)
        self.keys, self.values = self.keys.index_select(2, idx), self.values.index_select(2, idx)
        self.stale = None

    def evict(self) -> None:
        slots = super().stored
        if slots <= self.budget:
            return
        if slots > self.budget + 1:
            recent = self.budget + 1 - self.sinks
            self.keys = torch.cat([self.keys[:, :, : self.sinks], self.keys[:, :, -recent:]], dim=2)
            self.values = torch.cat([self.values[:, :, : self.sinks], self.values[:, :, -recent:]], dim=2)
        self.stale = self.sinks  # the oldest recent token: evicted, its slot takes the next one

    def reset_stats(self) -> None:
        self.stale = None


class StreamingLLM(KVPolicy):
    """Attention sinks + recent window; `budget` tokens per layer and head."""

    name = "streaming_llm"
    Config = StreamingLLMConfig

    def make_layer(self, layer_idx: int, n_layers: int) -> PolicyLayer:
        return StreamingLLMLayer(self.config.budget, self.config.sinks)

    def layer_bytes(self, layer_idx, n_layers, tokens, batch, kv_heads, head_dim, elem) -> int:
        return dense_bytes(min(tokens, self.config.budget + 1), batch, kv_heads, head_dim, elem)
