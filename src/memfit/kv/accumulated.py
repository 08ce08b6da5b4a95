"""Accumulated-score eviction (H2O, Keyformer) with in-place decode steps.

A layer keeps the `recent` most recent tokens plus the tokens with the largest accumulated score: `scores`
(B, H_kv, slots) float32 grows by `row_scores(probs)` summed over the queries of every step and the query heads that
share a KV head; `pos` (B, H_kv, slots) int32 is each slot's absolute position, so recency does not depend on where
a token sits.

Decoding adds one token and evicts one, so after the cache is full it stores `budget + 1` slots: the `budget` kept
tokens and the slot of the token evicted last (`stale`, one index per batch row and head). A decode step writes the
new token into that slot (`index_copy_`, no copy of the cache), attention reads all `budget + 1` slots — the kept
tokens and the new one, as with an append — and eviction only picks the next stale slot (an `argmin` over the
tokens outside the recent window). Keys are then in slot order, not position order; attention does not depend on
the order of the keys it reads (they carry their rotary position), so outputs equal the append-and-gather ones up
to float summation order. A forward of several tokens (chunked prefill) takes the general path: drop the stale
slot, append, keep the top `budget + 1` (recent window protected) and mark the worst of them stale.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from memfit.errors import ConfigError
from memfit.kv.base import (SCORE_BYTES, BudgetConfig, KVPolicy, PolicyCache, PolicyLayer, dense_bytes,
                            gather_tokens, keep_top, kv_geometry)

POS_BYTES = 4  # int32 position per slot and head
QUANT_BITS = {"kivi2": 2, "kivi4": 4, "kivi8": 8}  # `quant`: stored as in `kv.quantized_slots`


class AccumulatedScoreLayer(PolicyLayer):
    """Recent window + best accumulated score; `budget + 1` slots once full, decode steps in place.

    Decode hot path (issue 15: H2O decoded at 0.84× transformers' sliding window): once full, the slots' storage never
    changes, so the layer keeps flat (rows · slots, ...) views of keys, values, scores and positions (`_flat`) and
    the stale slot as a flat index (`stale`, one per batch row and head): a step is two `index_copy_`, two
    `index_fill_`, one in-place add of the attention and one masked `argmin` — no allocation beyond the argmin's
    temporaries and no Python loop.
    """

    needs_attention = True

    def __init__(self, budget: int, recent: int) -> None:
        super().__init__(budget)
        self.recent = recent
        self.scores: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.stale: torch.Tensor | None = None  # (B · H_kv,) flat slot of the token evicted last, or None
        self._flat: tuple[torch.Tensor, ...] | None = None  # keys, values, scores, pos over (B · H_kv · slots)
        self._rows: torch.Tensor | None = None  # (B · H_kv,) flat index of each row's first slot
        self._stack: LayerStack | None = None  # scores/pos shared with the other layers while decoding
        self._pending: torch.Tensor | None = None  # this decode step's attention, scored and evicted for all layers
        self._reset_done = False  # the batched eviction already reset the stale slot's score and position

    def row_scores(self, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def slots(self) -> int:
        """Token slots held: the kept tokens plus, once full, the stale slot."""
        return super().stored

    @property
    def stored(self) -> int:
        return self.slots() - (self.stale is not None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[-2] != 1 or self.stale is None:
            self._drop_stale()
            return super().update(key_states, value_states)
        if self._pending is not None:  # the batched eviction did not run (no forward of the model with the hooks)
            self._evict_pending()
        keys, values, scores, pos = self._flat
        keys.index_copy_(0, self.stale, key_states.reshape(-1, key_states.shape[-1]))
        values.index_copy_(0, self.stale, value_states.reshape(-1, value_states.shape[-1]))
        if not self._reset_done:
            scores.index_fill_(0, self.stale, 0.0)
            pos.index_fill_(0, self.stale, self.seen)
        self._reset_done = False
        self.seen += 1
        self.stale = None
        return self.keys, self.values

    def _stale_slots(self) -> torch.Tensor:
        """The stale slot of each batch row and head, (B, H_kv)."""
        return (self.stale - self._rows).view(self.keys.shape[:2])

    def _drop_stale(self) -> None:
        """Compact the slots without the stale one (before a multi-token forward)."""
        if self.stale is None:
            return
        slots = self.slots()
        ar = torch.arange(slots - 1, device=self.keys.device)
        idx = torch.where(ar >= self._stale_slots()[..., None], ar + 1, ar)
        self.stale = None
        self._gather(idx)

    def _gather(self, idx: torch.Tensor) -> None:
        self.keys, self.values = gather_tokens(self.keys, idx), gather_tokens(self.values, idx)
        self.scores, self.pos = self.scores.gather(2, idx), self.pos.gather(2, idx)
        self._flat = self._stack = None

    def on_append(self, n: int) -> None:
        b, h = self.keys.shape[:2]
        device = self.keys.device
        new = torch.zeros(b, h, n, dtype=torch.float32, device=device)
        pos = torch.arange(self.seen - n, self.seen, dtype=torch.int32, device=device).expand(b, h, n)
        self.scores = new if self.scores is None else torch.cat([self.scores, new], dim=-1)
        self.pos = pos.contiguous() if self.pos is None else torch.cat([self.pos, pos], dim=-1)
        self._flat = self._stack = None

    def observe_attention(self, probs: torch.Tensor) -> None:
        if self._stack is not None and self.stale is None and self.slots() == self.budget + 1:
            self._pending = probs  # decode step: `evict_together` scores and evicts every layer at once
            return
        add_scores(self.scores, self.row_scores(probs))
        self.evict()

    def _evict_pending(self) -> None:
        probs, self._pending = self._pending, None
        add_scores(self.scores, self.row_scores(probs))
        self.evict()

    def share_scoring(self, others: list[AccumulatedScoreLayer]) -> None:
        """`row_scores` of this layer just scored `others`' attention too (`LayerStack`): keep their state in step."""


    def evict(self) -> None:
        slots = self.slots()
        if slots <= self.budget:
            return
        if slots > self.budget + 1:
            self._gather(keep_top(self.scores, self.budget + 1, self._protected()))
        if self._flat is None:  # the slots' storage is fixed from here until the next multi-token forward
            d = self.keys.shape[-1]
            self._flat = (self.keys.view(-1, d), self.values.view(-1, d), self.scores.view(-1), self.pos.view(-1))
            rows = self.keys.shape[0] * self.keys.shape[1]
            self._rows = torch.arange(0, rows * (self.budget + 1), self.budget + 1, device=self.keys.device)
        shielded = self.scores.masked_fill(self._protected(), float("inf"))
        self.stale = shielded.argmin(dim=-1).view(-1).add_(self._rows)

    def _protected(self) -> torch.Tensor:
        return self.pos >= self.seen - min(self.recent, self.budget)

    def kept(self) -> torch.Tensor:
        """Positions (B, H_kv, stored) of the tokens kept, ascending (the stale slot left out)."""
        pos = self.pos if self.stale is None else self.pos.scatter(2, self._stale_slots()[..., None], -1)
        return pos.sort(dim=-1).values[..., int(self.stale is not None):]

    def reset_stats(self) -> None:
        self.scores = self.pos = self.stale = self._flat = self._rows = self._stack = None
        self._pending, self._reset_done = None, False

    stackable = True  # `evict_together` may share this layer's scores with the other layers' (see `LayerStack`)

    @staticmethod
    def evict_together(cache: PolicyCache) -> None:
        """After a forward (`PolicyCache.after_forward`): evict every layer of a decode step at once. Once every layer
        is full and decoding in place, their scores and positions move into one `LayerStack`; the stack lasts until a
        multi-token forward reallocates a layer."""
        layers = cache.layers
        stack = cache.shared
        if stack is not None and not stack.intact():
            stack = cache.shared = None
        if stack is None:
            first = layers[0]
            if len(layers) > 1 and all(
                    type(layer).stackable and layer._flat is not None and layer.stale is not None
                    and (layer.budget, layer.recent, layer.seen) == (first.budget, first.recent, first.seen)
                    and layer.scores.shape == first.scores.shape for layer in layers):
                cache.shared = LayerStack(layers)
            return
        if all(layer._pending is not None for layer in layers):
            stack.evict()
        else:
            for layer in layers:
                if layer._pending is not None:
                    layer._evict_pending()

    def stats_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.scores, self.pos)


def add_scores(scores: torch.Tensor, rows: torch.Tensor) -> None:
    """scores (..., slots) += `rows` (..., group, queries, slots) summed over the query heads of a KV head and the
    queries; with one of each (decode, no GQA) the rows are the scores and need no reduction."""
    *lead, group, q, k = rows.shape
    scores += rows.view(*lead, k) if group * q == 1 else rows.sum(dim=(-3, -2))


class LayerStack:
    """The scores and positions of all layers in one (L, B, H_kv, slots) tensor each (the layers hold views), so a
    decode step's scoring and ranking — the scores' update (Keyformer: its noise), recent-window mask, argmin, reset
    of the stale slots — run once for the whole model instead of once per layer (issue 15: small per-layer ops
    dominated H2O's and Keyformer's decode overhead on small models). The layers hand their attention over in
    `observe_attention`; `evict` runs after the forward (`PolicyCache.after_forward`). Keyformer then draws one
    noise tensor for all layers from the first layer's generator (the same distribution, another stream)."""

    def __init__(self, layers: list[AccumulatedScoreLayer]) -> None:
        self.layers = layers
        self.scores = torch.stack([layer.scores for layer in layers])
        self.pos = torch.stack([layer.pos for layer in layers])
        first = layers[0]
        self.rows = first._rows  # the same in every layer: row r starts at r · slots
        per_layer = first.scores.numel()
        self.offsets = torch.arange(0, len(layers) * per_layer, per_layer, device=self.scores.device)[:, None]
        for i, layer in enumerate(layers):
            layer.scores, layer.pos = self.scores[i], self.pos[i]
            layer._flat = (*layer._flat[:2], layer.scores.view(-1), layer.pos.view(-1))
            layer._stack = self

    def intact(self) -> bool:
        return all(layer._stack is self for layer in self.layers)

    def evict(self) -> None:
        first = self.layers[0]
        probs = torch.stack([layer._pending for layer in self.layers])  # (L, B, H_kv, group, queries, slots)
        add_scores(self.scores, first.row_scores(probs))
        first.share_scoring(self.layers[1:])
        shielded = self.scores.masked_fill(self.pos >= first.seen - min(first.recent, first.budget), float("inf"))
        stale = shielded.argmin(dim=-1).view(len(self.layers), -1).add_(self.rows)  # per layer, its own flat index
        flat = (stale + self.offsets).view(-1)
        self.scores.view(-1).index_fill_(0, flat, 0.0)  # the slot's next token: no attention yet, position `seen`
        self.pos.view(-1).index_fill_(0, flat, first.seen)
        for layer, layer_stale in zip(self.layers, stale):
            layer.stale, layer._pending, layer._reset_done = layer_stale, None, True


def scored_bytes(tokens: int, budget: int, batch: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """Keys and values of the slots (the kept tokens, plus the stale slot once full) and a float32 score and an
    int32 position per slot and head."""
    slots = min(tokens, budget + 1)
    return dense_bytes(slots, batch, kv_heads, head_dim, elem) + batch * kv_heads * slots * (SCORE_BYTES + POS_BYTES)


def quantized_bytes(tokens: int, budget: int, residual: int, bits: int, group: int, batch: int, kv_heads: int,
                    head_dim: int, elem: int) -> int:
    """Bytes after `tokens` tokens: `min(tokens, budget + 1)` slots, the last `residual` in full precision, the
    others as codes (head_dim · bits / 8 bytes each for K and V) with a scale and a minimum per `group` channels,
    plus a float32 score and an int32 position per slot."""
    rows = batch * kv_heads
    slots = min(tokens, budget + 1)
    full = min(tokens, residual)
    packed = slots - full
    per_packed = 2 * (head_dim * bits // 8 + 2 * (head_dim // group) * elem)
    return rows * (packed * per_packed + full * 2 * head_dim * elem + slots * (SCORE_BYTES + POS_BYTES))


class AccumulatedConfig(BudgetConfig):
    """Options shared by H2O and Keyformer: `quant` stores the kept tokens KIVI-quantized
    (`memfit.kv.quantized_slots`; `--kv-quant kivi4`), the last `quant_residual` of them in full precision."""

    quant: Optional[Literal["kivi2", "kivi4", "kivi8"]] = None
    quant_residual: int = Field(32, gt=0, description="with quant: most recent tokens kept in full precision (at "
                                "most the recent window)")
    quant_group: int = Field(32, gt=0, description="with quant: channels per quantization group (capped at head_dim)")

    @model_validator(mode="after")
    def _quant_needs_recent(self):
        if self.quant is not None and getattr(self, "recent_ratio", 1) <= 0:
            raise ValueError("quant needs recent_ratio > 0: the full-precision residual lives in the recent window")
        return self


class AccumulatedScorePolicy(KVPolicy):
    """A recent window plus the best-scored other tokens (`AccumulatedScoreLayer`; H2O, Keyformer): `budget`
    tokens per layer and head, `config.recent_ratio` of them the most recent (at least one if the ratio is > 0);
    with `config.quant`, the kept tokens stored KIVI-quantized (`QuantizedScoreLayer`)."""

    needs_attention = True

    def recent(self) -> int:
        budget, ratio = self.config.budget, self.config.recent_ratio
        return min(budget, max(1, round(budget * ratio))) if ratio > 0 else 0

    # --- quantized storage (config.quant) -----------------------------------------------------------------
    def quant_bits(self) -> int | None:
        return QUANT_BITS[self.config.quant] if self.config.quant else None

    def quant_residual(self) -> int:
        return min(self.config.quant_residual, self.recent())

    def quant_group(self, head_dim: int) -> int:
        return min(self.config.quant_group, head_dim)

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        bits = self.quant_bits()
        if bits is None:
            return
        _, _, head_dim = kv_geometry(model)
        group = self.quant_group(head_dim)
        if head_dim % group:
            raise ConfigError(f"{self.name}: quant_group ({group}) must divide head_dim ({head_dim})")
        if (head_dim * bits) % 8:
            raise ConfigError(f"{self.name}: head_dim ({head_dim}) × {bits} bits must fill whole bytes")

    def make_cache(self, model: nn.Module) -> PolicyCache:
        self._head_dim = kv_geometry(model)[2]
        return super().make_cache(model)

    def scored_layer(self, plain: type, quantized: type, **options: Any) -> PolicyLayer:
        """A layer of class `plain`, or of `quantized` (its `QuantizedScoreLayer` form) when `config.quant` is set."""
        c = self.config
        if c.quant is None:
            return plain(c.budget, self.recent(), **options)
        return quantized(c.budget, self.recent(), self.quant_bits(), self.quant_residual(),
                         self.quant_group(self._head_dim), **options)

    def layer_bytes(self, layer_idx, n_layers, tokens, batch, kv_heads, head_dim, elem) -> int:
        if self.config.quant is None:
            return scored_bytes(tokens, self.config.budget, batch, kv_heads, head_dim, elem)
        return quantized_bytes(tokens, self.config.budget, self.quant_residual(), self.quant_bits(),
                               self.quant_group(head_dim), batch, kv_heads, head_dim, elem)

    def update_overshoot(self, layer_idx, n_layers, past, chunk, batch, kv_heads, head_dim, elem) -> int:
        """Unquantized: see `KVPolicy`. Quantized: the dequantized past, the concatenated keys/values attention
        reads, the unpacked codes, and the chunk's tokens in full precision until they are quantized."""
        if self.config.quant is None:
            return super().update_overshoot(layer_idx, n_layers, past, chunk, batch, kv_heads, head_dim, elem)
        return (dense_bytes(past, batch, kv_heads, head_dim, elem) + dense_bytes(past + chunk, batch, kv_heads,
                head_dim, elem) + dense_bytes(chunk, batch, kv_heads, head_dim, elem)
                + 2 * batch * kv_heads * past * head_dim)
