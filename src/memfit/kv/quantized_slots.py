"""Eviction and quantization composed: an accumulated-score policy (H2O, Keyformer) whose kept tokens are stored
KIVI-quantized (`--kv h2o --kv-quant kivi4`).

Liu et al. (2024), "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024) for the storage;
Zhang et al. (2023), "H2O" / Adnan et al. (2024), "Keyformer" for the choice of tokens. Combining the two is what
MiniKV (Sharma et al. 2024) and Q-Hitter (Zhang et al. 2024) do; kvpress users ask for it (kvpress #102, #230).

The policy keeps exactly its `budget` tokens per layer and head (the choice is the unquantized policy's: same scores,
same recent window), and stores them in two parts:
- a full-precision window of the `residual` most recent tokens (KIVI's residual; at most the recent window, so these
  tokens are never eviction candidates);
- every older kept token quantized *per token*: keys and values each in groups of `group` channels with their own
  min-max scale (asymmetric integers, 2/4/8 bits, packed). KIVI quantizes keys per channel over a group of tokens;
  token-level eviction breaks such groups apart (a surviving token would need its group's scales, or be
  requantized), so here keys take KIVI's value layout. The quality rows in docs/benchmarks.md show what that costs.

Decode steps stay in place, as in `AccumulatedScoreLayer`: once full, the layer holds `budget + 1` slots (the kept
tokens and the stale slot of the token evicted last); a step quantizes the oldest residual token into the stale slot
(one token, `index_copy_`), writes the new token into its residual slot (a ring), and attention reads the
dequantized quantized slots next to the residual — a temporary, as in KIVI. Bytes held: the codes, scales and minimums
of `budget + 1 - residual` slots, `residual` full-precision tokens, and a float32 score and int32 position per slot
(`accumulated.quantized_bytes`, equal to the measured cache, tested).
"""

from __future__ import annotations

from typing import Any

import torch

from memfit.kv import quant
from memfit.kv.accumulated import AccumulatedScoreLayer
from memfit.kv.base import PolicyLayer, gather_tokens, keep_top

class QuantizedScoreLayer(AccumulatedScoreLayer):
    """`AccumulatedScoreLayer` with the kept tokens older than the residual window stored quantized per token.

    `keys`/`values` (B, H_kv, ≤ residual, D) are the full-precision residual (position order, or a ring from `ring`
    once decoding in place); `packed` = (key codes, key scales, key minimums, value codes, value scales, value
    minimums), each (B, H_kv, quantized slots, ...); `scores`/`pos` cover the quantized slots, then the residual.
    """

    stackable = False  # its own decode step (quantize + ring); ranked per layer

    def __init__(self, budget: int, recent: int, bits: int, residual: int, group: int, **kwargs: Any) -> None:
        super().__init__(budget, recent, **kwargs)
        self.bits, self.residual, self.group = bits, residual, group
        self.packed: tuple[torch.Tensor, ...] | None = None
        self.ring = 0  # index in the residual of its oldest token
        self._stale_stats: torch.Tensor | None = None  # the stale slot as a flat index into scores / pos

    # --- storage ---------------------------------------------------------------------------------------
    @property
    def quantized(self) -> int:
        return 0 if self.packed is None else self.packed[0].shape[2]

    def slots(self) -> int:
        return PolicyLayer.stored.fget(self) + self.quantized

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed codes (B, H, n, D·bits/8), scales, minimums (B, H, n, D/group)) of tokens (B, H, n, D)."""
        b, h, n, d = x.shape
        codes, scale, lo = quant.quantize(x.reshape(b, h, n, d // self.group, self.group), self.bits, dim=4)
        return quant.pack(codes.view(b, h, n, d), self.bits), scale.view(b, h, n, -1), lo.view(b, h, n, -1)

    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        b, h, n, _ = codes.shape
        d = self.keys.shape[-1]
        c = quant.unpack(codes, self.bits).view(b, h, n, d // self.group, self.group)
        return quant.dequantize(c, scale[..., None], lo[..., None]).view(b, h, n, d)

    def _attended(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values attention reads: the dequantized slots (a temporary) followed by the residual."""
        if self.packed is None:
            return self.keys, self.values
        kq, ks, km, vq, vs, vm = self.packed
        return (torch.cat([self._dequantize(kq, ks, km), self.keys], dim=2),
                torch.cat([self._dequantize(vq, vs, vm), self.values], dim=2))

    # --- forward ---------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[-2] == 1 and self.stale is not None and self.keys.shape[2] == self.residual:
            self._step(key_states, value_states)
        else:
            self._drop_stale()
            self._in_order()
            self.append(key_states, value_states)
            self.on_append(key_states.shape[-2])
        return self._attended()

    def _step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """In place: the oldest residual token is quantized into the stale slot, the new one takes its place."""
        j, q = self.ring, self.quantized
        new = (*self._quantize(self.keys[:, :, j:j + 1]), *self._quantize(self.values[:, :, j:j + 1]))
        for flat, t in zip(self._flat, new):
            flat.index_copy_(0, self.stale, t.reshape(-1, t.shape[-1]))
        scores, pos = self.scores.view(-1), self.pos.view(-1)
        scores.index_copy_(0, self._stale_stats, self.scores[:, :, q + j].reshape(-1))
        pos.index_copy_(0, self._stale_stats, self.pos[:, :, q + j].reshape(-1))
        self.scores[:, :, q + j] = 0.0
        self.pos[:, :, q + j] = self.seen
        self.keys[:, :, j:j + 1].copy_(key_states)
        self.values[:, :, j:j + 1].copy_(value_states)
        self.ring = (j + 1) % self.residual
        self.seen += 1
        self.stale = self._stale_stats = None

    def _in_order(self) -> None:
        """Put the residual (and its statistics) back in position order before a general forward."""
        if self.ring == 0:
            return
        q = self.quantized
        self.keys, self.values = (t.roll(-self.ring, dims=2) for t in (self.keys, self.values))
        self.scores, self.pos = (torch.cat([t[..., :q], t[..., q:].roll(-self.ring, dims=-1)], dim=-1)
                                 for t in (self.scores, self.pos))
        self.ring = 0

    def _drop_stale(self) -> None:
        if self.stale is None:
            return
        q, r = self.quantized, self.keys.shape[2]
        ar = torch.arange(q - 1, device=self.keys.device)
        idx = torch.where(ar >= self._stale_slots()[..., None], ar + 1, ar)
        self.stale = self._stale_stats = None
        self._gather(idx, torch.arange(q, q + r, device=idx.device).expand(*idx.shape[:2], r))

    def _gather(self, quantized_idx: torch.Tensor, residual_idx: torch.Tensor) -> None:
        """Keep the quantized slots `quantized_idx` and the stats of those plus `residual_idx` (B, H, ·)."""
        self.packed = tuple(gather_tokens(t, quantized_idx) for t in self.packed)
        idx = torch.cat([quantized_idx, residual_idx], dim=-1)
        self.scores, self.pos = self.scores.gather(2, idx), self.pos.gather(2, idx)
        self._flat = None

    def _spill(self) -> None:
        """Quantize the residual's tokens beyond `residual` (oldest first) into new quantized slots."""
        extra = self.keys.shape[2] - self.residual
        if extra <= 0:
            return
        new = (*self._quantize(self.keys[:, :, :extra]), *self._quantize(self.values[:, :, :extra]))
        self.packed = new if self.packed is None else tuple(torch.cat([a, b], dim=2)
                                                            for a, b in zip(self.packed, new))
        self.keys, self.values = self.keys[:, :, extra:].clone(), self.values[:, :, extra:].clone()
        self._flat = None  # the statistics keep their order: [quantized | residual]

    def evict(self) -> None:
        self._spill()
        slots = self.slots()
        if slots <= self.budget:
            return
        r, q = self.keys.shape[2], self.quantized
        if slots > self.budget + 1:  # the residual is inside the protected recent window, so it is kept
            idx = keep_top(self.scores, self.budget + 1, self._protected())
            q = self.budget + 1 - r
            self._gather(idx[..., :q], idx[..., q:])
        if self._flat is None:
            self._flat = tuple(t.view(-1, t.shape[-1]) for t in self.packed)
            rows = self.keys.shape[0] * self.keys.shape[1]
            self._rows = torch.arange(0, rows * q, q, device=self.keys.device)
            self._stats_rows = torch.arange(0, rows * (q + r), q + r, device=self.keys.device)
        shielded = self.scores[..., :q].masked_fill(self._protected()[..., :q], float("inf"))
        slot = shielded.argmin(dim=-1).view(-1)
        self.stale, self._stale_stats = slot + self._rows, slot + self._stats_rows

    def reset_stats(self) -> None:
        super().reset_stats()
        self.packed = self._stale_stats = None
        self.ring = 0

    def stats_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.scores, self.pos, *(self.packed or ()))
