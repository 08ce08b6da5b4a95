"""Ada-KV: one budget per layer, shared by its heads in proportion to where their attention concentrates.

Feng, Lv, Cao, Xie, Zhou (2024). "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference". arXiv:2407.11550.

A uniform policy gives every KV head the same `budget` tokens; heads whose attention is concentrated on few tokens
waste theirs while dispersed heads lose mass. Ada-KV keeps the layer's total, `budget · kv_heads`, and takes the top
scores over all heads' tokens flattened together, so each head keeps as many tokens as its scores win (every head keeps
at least its recent window, the paper's safeguard). Scores (`scoring`): H2O's accumulated attention, or SnapKV's —
the attention of the last `window` queries, max-pooled over each head's neighbouring positions, the window's tokens
always kept — which is what the paper plugs its allocation into. Probabilities are normalised per head, so heads
compare directly.

Layout (memory is really saved, not masked): per batch row, one pool of `budget · kv_heads` slots holding keys and
values (B, slots, D) with each slot's head (int32), accumulated score (float32) and position (int32) — no padding is
stored. Attention needs (B, H, L, D) tensors, so each forward gathers a padded view, L = the longest head, and the
attention pre-hook adds a per-head mask over the padding (`attention_bias`): that view is a temporary of up to
L · kv_heads tokens, counted in the peak estimate. Eager attention only (the scores need the probabilities).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from memfit.kv.base import SCORE_BYTES, BudgetConfig, KVPolicy, PolicyCache, PolicyLayer, dense_bytes, kv_geometry

HEAD_BYTES = POS_BYTES = 4  # int32 head id and position per slot


class AdaKVConfig(BudgetConfig):
    name: str = "adakv"
    recent_ratio: float = Field(0.5, ge=0, le=1, description="h2o scoring: share of the per-head budget every head "
                                "keeps for its most recent tokens (the safeguard)")
    scoring: Literal["h2o", "snapkv"] = "h2o"
    window: int = Field(16, gt=0, description="snapkv scoring: observation window (kept by every head)")
    kernel: int = Field(7, gt=0, description="snapkv scoring: max-pooling kernel over neighbouring positions (odd)")


class AdaKVLayer(PolicyLayer):
    """A pool of `budget · heads` slots per batch row shared by the layer's KV heads (see the module docstring)."""

    needs_attention = True

    def __init__(self, budget: int, recent: int, heads: int, window: int | None = None, kernel: int = 1) -> None:
        super().__init__(None)  # heads hold different lengths; the bound is the pool's size (`evict` checks it)
        self.per_head, self.recent, self.heads = budget, recent, heads
        self.window, self.kernel = window, kernel  # window: SnapKV scoring (`obs` rows per slot), None: H2O
        self.pool: dict[str, torch.Tensor] = {}  # keys, values (B, N, D); head, score, pos (B, N)
        self.longest = 0  # tokens of the longest head: the padded view's length
        self._view: tuple[torch.Tensor, torch.Tensor] | None = None  # (index, valid) (B, H, longest)
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def stored(self) -> int:
        return self.longest

    def kv_heads(self) -> int:
        return self.heads

    def head_lengths(self) -> torch.Tensor:
        """Tokens each head keeps, (B, H)."""
        head = self.pool["head"].long()
        return torch.zeros(head.shape[0], self.heads, dtype=torch.long, device=head.device).scatter_add_(
            1, head, torch.ones_like(head))

    def _build_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index into the pool, valid) (B, H, longest): each head's slots in position order, then padding."""
        if not self.pool:
            return (torch.zeros(0, dtype=torch.long),) * 2
        head, pos = self.pool["head"].long(), self.pool["pos"].long()
        b, n = head.shape
        order = (head * (self.seen + 1) + pos).argsort(dim=1)
        lengths = self.head_lengths()
        starts = lengths.cumsum(1) - lengths
        sorted_head = head.gather(1, order)
        rank = torch.arange(n, device=head.device) - starts.gather(1, sorted_head)
        where = sorted_head * self.longest + rank
        index = torch.zeros(b, self.heads * self.longest, dtype=torch.long, device=head.device).scatter_(1, where,
                                                                                                       order)
        valid = torch.zeros(b, self.heads * self.longest, dtype=torch.bool, device=head.device).scatter_(
            1, where, torch.ones_like(where, dtype=torch.bool))
        return index.view(b, self.heads, self.longest), valid.view(b, self.heads, self.longest)

    def attention_bias(self, query_length: int, dtype: torch.dtype, n_rep: int) -> torch.Tensor | None:
        """Additive mask (B, H_q, 1, longest + q) hiding each head's padding, or None when no head is padded;
        called by the attention pre-hook before `update`."""
        self._view = self._build_view()
        if not self.pool or bool(self._view[1].all()):
            return None
        valid = self._view[1]
        bias = torch.zeros(valid.shape[0], self.heads, 1, self.longest + query_length, dtype=dtype,
                           device=valid.device)
        bias[..., :self.longest].masked_fill_(~valid[:, :, None, :], torch.finfo(dtype).min)
        return bias.repeat_interleave(n_rep, dim=1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.seen += key_states.shape[-2]
        self._new = (key_states, value_states)
        if not self.pool:
            return key_states, value_states
        index, _ = self._view if self._view is not None else self._build_view()
        b, h, length = index.shape
        d = key_states.shape[-1]
        flat = index.view(b, h * length, 1).expand(-1, -1, d)
        past = [self.pool[name].gather(1, flat).view(b, h, length, d) for name in ("keys", "values")]
        return torch.cat([past[0], key_states], dim=2), torch.cat([past[1], value_states], dim=2)

    def observe_attention(self, probs: torch.Tensor) -> None:
        k, v = self._new
        b, q, d = k.shape[0], k.shape[2], k.shape[-1]
        device = k.device
        new = {"keys": k.reshape(b, self.heads * q, d), "values": v.reshape(b, self.heads * q, d),
               "head": torch.arange(self.heads, dtype=torch.int32, device=device).repeat_interleave(q).expand(b, -1),
               "pos": torch.arange(self.seen - q, self.seen, dtype=torch.int32, device=device).repeat(self.heads)
               .expand(b, -1)}
        if self.window is None:  # H2O: accumulate
            scores = probs.sum(dim=(2, 3))  # (B, H, longest + q)
            if self.pool:  # padding got probability 0 (masked), so it adds nothing to the slot it points at
                index, _ = self._view
                self.pool["score"].scatter_add_(1, index.reshape(b, -1), scores[..., :self.longest].reshape(b, -1))
            new["score"] = scores[..., self.longest:].reshape(b, -1)
        else:  # SnapKV: the attention rows of the last `window` queries, per slot (B, slots, ≤ window)
            rows = probs.sum(dim=2)[:, :, -self.window:]  # (B, H, m, longest + q)
            m = rows.shape[2]
            if self.pool:
                index, _ = self._view
                past = torch.zeros(b, self.pool["obs"].shape[1], m, device=device).scatter_add_(
                    1, index.reshape(b, -1, 1).expand(-1, -1, m),
                    rows[..., :self.longest].permute(0, 1, 3, 2).reshape(b, -1, m))
                self.pool["obs"] = torch.cat([self.pool["obs"], past], dim=2)[..., -self.window:]
            cols = self.pool["obs"].shape[2] if self.pool else m
            fresh = rows[..., self.longest:].permute(0, 1, 3, 2).reshape(b, self.heads * q, m)
            new["obs"] = torch.nn.functional.pad(fresh, (cols - m, 0))  # earlier queries paid them nothing
        self.pool = {name: t.contiguous() if name not in self.pool else torch.cat([self.pool[name], t], dim=1)
                     for name, t in new.items()}
        self._new = self._view = None
        self.evict()

    def _snap_scores(self) -> torch.Tensor:
        """SnapKV's score per slot (B, slots): window attention, max-pooled along each head's positions."""
        raw = self.pool["obs"].sum(dim=-1)
        if self.kernel <= 1:
            return raw
        index, valid = self._build_view()
        b, h, length = index.shape
        view = raw.gather(1, index.view(b, -1)).view(b, h, length).masked_fill(~valid, float("-inf"))
        pooled = torch.nn.functional.max_pool1d(view.view(b * h, 1, length), self.kernel, stride=1,
                                                padding=self.kernel // 2)[..., :length].view(b, -1)
        slots = raw.shape[1]  # padding scatters into a spare column that is dropped
        target = torch.where(valid.view(b, -1), index.view(b, -1), slots)
        return torch.zeros(b, slots + 1, device=raw.device).scatter_(1, target, pooled)[:, :slots]

    def evict(self) -> None:
        total = self.per_head * self.heads
        if self.pool["head"].shape[1] > total:
            protected = self.pool["pos"] >= self.seen - min(self.recent, self.per_head)
            if self.window is None:
                scores = self.pool["score"]
            else:
                self.longest = int(self.head_lengths().max())
                scores = self._snap_scores()
            keep = scores.masked_fill(protected, float("inf")).topk(total, dim=1).indices
            self.pool = {name: t.gather(1, keep if t.dim() == 2 else keep[..., None].expand(-1, -1, t.shape[-1]))
                         for name, t in self.pool.items()}
        self.longest = int(self.head_lengths().max())

    def reset_stats(self) -> None:
        self.pool, self.longest, self._view, self._new = {}, 0, None, None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool.values())


class AdaKV(KVPolicy):
    """H2O scores, one budget per layer allocated across its KV heads by top-k over all heads (Ada-KV);
    `budget` is the mean per head."""

    name = "adakv"
    Config = AdaKVConfig
    needs_attention = True

    def recent(self) -> int:
        budget, ratio = self.config.budget, self.config.recent_ratio
        if self.config.scoring == "snapkv":
            return min(self.config.window, budget)
        return min(budget, max(1, round(budget * ratio))) if ratio > 0 else 0

    def make_cache(self, model: nn.Module) -> PolicyCache:
        self._kv_heads = kv_geometry(model)[1]
        return super().make_cache(model)

    def make_layer(self, layer_idx: int, n_layers: int) -> PolicyLayer:
        c = self.config
        snap = c.scoring == "snapkv"
        return AdaKVLayer(c.budget, self.recent(), self._kv_heads, c.window if snap else None, c.kernel if snap else 1)

    def layer_bytes(self, layer_idx, n_layers, tokens, batch, kv_heads, head_dim, elem) -> int:
        c = self.config
        kept = min(tokens, c.budget)
        stats = (min(c.window, tokens) * SCORE_BYTES if c.scoring == "snapkv" else SCORE_BYTES) + POS_BYTES + HEAD_BYTES
        return dense_bytes(kept, batch, kv_heads, head_dim, elem) + batch * kv_heads * kept * stats

    def update_overshoot(self, layer_idx, n_layers, past, chunk, batch, kv_heads, head_dim, elem) -> int:
        """The padded view attention reads (the longest head: at most the pool minus the other heads' recent
        windows) concatenated with the chunk, alive through attention, plus the larger of what sits next to it at
        two different moments: the gathered view before the concatenation (`update`), or the pool grown by the
        chunk before it evicts (`observe_attention`; the gathered view is freed by then)."""
        longest = min(past * kv_heads - (kv_heads - 1) * min(self.recent(), past), past * kv_heads)
        view = dense_bytes(longest + chunk, batch, kv_heads, head_dim, elem)
        gathered = dense_bytes(longest, batch, kv_heads, head_dim, elem)
        grown = dense_bytes(past + chunk, batch, kv_heads, head_dim, elem) + batch * kv_heads * (past + chunk) * 12
        return view + max(gathered, grown)
