"""KIVI: keys quantized per channel, values per token, the newest tokens kept in full precision.

Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu (2024). "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache". ICML 2024.

Keys have outlier *channels*, so each channel is quantized over a group of `residual` tokens; values have no such
structure and are quantized per token over groups of `value_group` channels. The last tokens (fewer than `residual`)
stay in full precision until a whole group is complete; then the group is quantized and packed (8, 4 or 2 bits: 1, 2
or 4 codes per byte). Every step dequantizes the packed part into a temporary for attention, so the *stored* cache is
~bits/16 of a half-precision one. The paper reports 2-bit KIVI keeps LLaMA/Falcon/Mistral quality within a few
tenths of a point and cuts peak memory 2.6×. With `budget` set, KIVI composes with StreamingLLM-style eviction
at group granularity: beyond `budget` tokens per layer and head the oldest quantized groups after the first (which
holds the attention sinks) are dropped — a quantized group's per-channel key scales stay valid for its tokens, so
eviction never requantizes. (Unlike `transformers`' `QuantizedCache`, which quantizes both keys and
values per channel, this follows the paper's asymmetric layout.)
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from memfit.errors import ConfigError
from memfit.kv import quant
from memfit.kv.base import KVPolicy, PolicyCache, PolicyLayer, dense_bytes, kv_geometry, tensor_bytes
from memfit.techniques.base import TechniqueConfig


class KIVIConfig(TechniqueConfig):
    name: str = "kivi"
    bits: Literal[2, 4, 8] = 4
    residual: int = Field(32, gt=0, description="full-precision recent tokens; also the key quantization group")
    value_group: int = Field(32, gt=0, description="channels per value quantization group (capped at head_dim)")
    budget: Optional[int] = Field(None, gt=0, description="tokens kept per layer and head (None: all): beyond it the "
                                  "oldest quantized groups after the first (the attention sinks) are evicted")

    @model_validator(mode="after")
    def _budget_fits(self):
        if self.budget is not None and self.budget < 2 * self.residual:
            raise ValueError(f"budget ({self.budget}) must be at least 2 × residual ({2 * self.residual}): the first "
                             "quantized group (attention sinks), one more group and the full-precision residual")
        return self


class KIVILayer(PolicyLayer):
    """Packed quantized past (`kq`, `vq` + scales/minimums) and a full-precision residual (`keys`, `values`)."""

    def __init__(self, bits: int, residual: int, value_group: int, budget: int | None = None) -> None:
        super().__init__(budget=budget)
        self.bits, self.residual, self.value_group = bits, residual, value_group
        self.kq = self.k_scale = self.k_min = None
        self.vq = self.v_scale = self.v_min = None

    @property
    def quantized(self) -> int:
        return 0 if self.kq is None else self.kq.shape[2]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized past as (B, H, quantized, D) tensors in the cache dtype (a temporary)."""
        return self._dequantize(self.kq, self.k_scale, self.k_min, self.vq, self.v_scale, self.v_min)

    def _dequantize(self, kq, k_scale, k_min, vq, v_scale, v_min) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n, _ = kq.shape
        d = self.keys.shape[-1]
        kc = quant.unpack(kq, self.bits).view(b, h, n // self.residual, self.residual, d)
        keys = quant.dequantize(kc, k_scale, k_min).view(b, h, n, d)
        vc = quant.unpack(vq, self.bits).view(b, h, n, d // self.value_group, self.value_group)
        values = quant.dequantize(vc, v_scale, v_min).view(b, h, n, d)
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.append(key_states, value_states)
        if self.kq is not None:
            past_k, past_v = self.dequantized()
            out_k, out_v = torch.cat([past_k, self.keys], dim=-2), torch.cat([past_v, self.values], dim=-2)
        else:
            out_k, out_v = self.keys, self.values
        self._flush()
        self._evict_groups()
        return out_k, out_v

    def _evict_groups(self) -> None:
        """Over budget: drop the oldest quantized groups after the first (StreamingLLM's sinks, group-wise)."""
        if self.budget is None or self.stored <= self.budget:
            return
        r = self.residual
        drop = -(-(self.stored - self.budget) // r)  # whole groups
        keep_tokens = lambda t: torch.cat([t[:, :, :r], t[:, :, r * (1 + drop):]], dim=2)  # noqa: E731
        keep_groups = lambda t: torch.cat([t[:, :, :1], t[:, :, 1 + drop:]], dim=2)  # noqa: E731
        self.kq, self.vq = keep_tokens(self.kq), keep_tokens(self.vq)
        self.v_scale, self.v_min = keep_tokens(self.v_scale), keep_tokens(self.v_min)
        self.k_scale, self.k_min = keep_groups(self.k_scale), keep_groups(self.k_min)

    def _flush(self) -> None:
        n = (self.keys.shape[-2] // self.residual) * self.residual
        if n == 0:
            return
        self._compress(self.keys[:, :, :n], self.values[:, :, :n])
        self.keys, self.values = self.keys[:, :, n:].clone(), self.values[:, :, n:].clone()

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Packed codes and scales of whole groups: keys per channel over `residual` tokens, values per token."""
        b, h, n, d = k.shape
        kc, ks, km = quant.quantize(k.reshape(b, h, n // self.residual, self.residual, d), self.bits, dim=3)
        kc = quant.pack(kc.view(b, h, n, d), self.bits)
        vc, vs, vm = quant.quantize(v.reshape(b, h, n, d // self.value_group, self.value_group), self.bits, dim=4)
        vc = quant.pack(vc.view(b, h, n, d), self.bits)
        return kc, ks, km, vc, vs, vm

    def _compress(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize whole groups of tokens (B, H, n, D) and append them to the packed past."""
        self._append_packed(self._quantize(k, v))

    def _append_packed(self, packed: tuple[torch.Tensor, ...]) -> None:
        for name, t in zip(("kq", "k_scale", "k_min", "vq", "v_scale", "v_min"), packed):
            old = getattr(self, name)
            setattr(self, name, t if old is None else torch.cat([old, t], dim=2))

    @property
    def stored(self) -> int:
        return super().stored + self.quantized

    def reset_stats(self) -> None:
        self.kq = self.k_scale = self.k_min = None
        self.vq = self.v_scale = self.v_min = None

    def stats_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.kq, self.k_scale, self.k_min, self.vq, self.v_scale, self.v_min)

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values, *self.stats_tensors())


class KIVI(KVPolicy):
    """Asymmetric 2/4/8-bit KV quantization with a full-precision residual window."""

    name = "kivi"
    Config = KIVIConfig

    def _value_group(self, head_dim: int) -> int:
        return min(self.config.value_group, head_dim)

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        _, _, head_dim = kv_geometry(model)
        group = self._value_group(head_dim)
        if head_dim % group:
            raise ConfigError(f"kivi: value_group ({group}) must divide head_dim ({head_dim})")
        if (head_dim * self.config.bits) % 8:
            raise ConfigError(f"kivi: head_dim ({head_dim}) × bits ({self.config.bits}) must fill whole bytes")

    def make_cache(self, model: nn.Module) -> PolicyCache:
        self.check_model(model)
        n_layers, _, head_dim = kv_geometry(model)
        c = self.config
        return PolicyCache([KIVILayer(c.bits, c.residual, self._value_group(head_dim), c.budget)
                            for _ in range(n_layers)])

    def default_chunk(self) -> int:
        return max(256 // self.config.residual, 1) * self.config.residual

    def update_overshoot(self, layer_idx, n_layers, past, chunk, batch, kv_heads, head_dim, elem) -> int:
        """The dequantized past, the concatenated keys/values attention reads, and the unpacked codes."""
        grown = past + chunk
        return 2 * dense_bytes(grown, batch, kv_heads, head_dim, elem) + 2 * batch * kv_heads * past * head_dim

    def layer_bytes(self, layer_idx, n_layers, tokens, batch, kv_heads, head_dim, elem) -> int:
        c = self.config
        group = self._value_group(head_dim)
        quantized = (tokens // c.residual) * c.residual
        if c.budget is not None:  # whole groups evicted until the groups and the residual fit the budget
            quantized = min(quantized, (c.budget - tokens % c.residual) // c.residual * c.residual)
        rows = batch * kv_heads
        codes = 2 * rows * quantized * head_dim * c.bits // 8
        key_scales = 2 * rows * (quantized // c.residual) * head_dim * elem
        value_scales = 2 * rows * quantized * (head_dim // group) * elem
        residual = 2 * rows * (tokens % c.residual) * head_dim * elem
        return codes + key_scales + value_scales + residual
