"""GEAR: quantized KV cache + a low-rank and a sparse correction of the quantization error.

Kang, Zhang, Kundu, Jeong, Liu, Krishna, Zhao (2024). "GEAR: An Efficient KV Cache Compression Recipe for
Near-Lossless Generative Inference of LLM". arXiv:2403.05527.

Every full group of `residual` tokens (per layer and KV head) is compressed as X ≈ Q + L + S:
- S, the outliers: the `sparsity` share of the group's entries with the largest and the smallest values (half
  each), kept exactly (values in the cache dtype, int16 positions within the group);
- Q, the rest quantized as KIVI does (keys per channel over the group, values per token; 2/4/8 bits, packed) after
  the outliers are replaced by the group's mean, so they no longer stretch the quantization range;
- L, a rank-`rank` approximation of the remaining error X − S − Q (truncated SVD of each R × D group, stored as
  R × r and r × D factors).
Reconstruction: Q + L, with the outlier positions overwritten by S. Tokens of an incomplete group stay in full
precision (GEAR's streaming buffer). The paper reports 2-bit GEAR within ~0.5 points of fp16 on GSM8k/AQuA/BBH
with LLaMA-2/Mistral where 2-bit KIVI-style quantization loses several, at up to 2.4× peak-memory reduction.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from memfit.kv.base import PolicyCache, dense_bytes, kv_geometry
from memfit.kv.kivi import KIVI, KIVIConfig, KIVILayer


class GEARConfig(KIVIConfig):
    name: str = "gear"
    rank: int = Field(4, ge=0, description="rank of the low-rank error correction per group (0: none)")
    sparsity: float = Field(0.02, ge=0, lt=0.5, description="share of each group's entries kept exactly (outliers)")

    @model_validator(mode="after")
    def _no_budget(self):
        if self.budget is not None:
            raise ValueError("gear takes no budget (group eviction is KIVI's: use kivi --kv-budget)")
        return self


def outlier_count(group_entries: int, sparsity: float) -> int:
    """Entries kept exactly per group: an even number (largest and smallest halves), at least 0."""
    return 2 * math.ceil(group_entries * sparsity / 2)


class GEARLayer(KIVILayer):
    """KIVI's packed groups plus, per group and row, the outliers (`*_sv` values, `*_si` positions) and the
    low-rank factors (`*_la`: tokens × rank, `*_lb`: groups × rank × D)."""

    def __init__(self, bits: int, residual: int, value_group: int, rank: int, sparsity: float) -> None:
        super().__init__(bits, residual, value_group)
        self.rank, self.sparsity = rank, sparsity
        self.corrections: dict[str, torch.Tensor] = {}

    def _split_outliers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x with outliers set to the group mean, outlier values, positions) for x (B, H, n, D) in groups."""
        b, h, n, d = x.shape
        flat = x.reshape(b, h, n // self.residual, self.residual * d)
        k = outlier_count(self.residual * d, self.sparsity)
        if k == 0:
            empty = flat[..., :0]
            return x, empty, empty.to(torch.int16)
        idx = torch.cat([flat.topk(k // 2, dim=-1).indices, (-flat).topk(k // 2, dim=-1).indices], dim=-1)
        values = flat.gather(-1, idx)
        mean = flat.mean(dim=-1, keepdim=True).expand_as(idx)
        inlier = flat.scatter(-1, idx, mean).view(b, h, n, d)
        return inlier, values, idx.to(torch.int16 if self.residual * d < 2**15 else torch.int32)

    def _low_rank(self, error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (B, H, n, r) and (B, H, groups, r, D) of the best rank-r fit to each group of `error`."""
        b, h, n, d = error.shape
        groups = error.reshape(b, h, n // self.residual, self.residual, d).float()
        u, s, vh = torch.linalg.svd(groups, full_matrices=False)
        r = min(self.rank, s.shape[-1])
        a = (u[..., :r] * s[..., None, :r]).reshape(b, h, n, r).to(error.dtype)
        return a, vh[..., :r, :].to(error.dtype)

    def _compress(self, k: torch.Tensor, v: torch.Tensor) -> None:
        parts = {}
        inliers = []
        for name, x in (("k", k), ("v", v)):
            inlier, parts[f"{name}_sv"], parts[f"{name}_si"] = self._split_outliers(x)
            inliers.append(inlier)
        packed = self._quantize(*inliers)
        deq_k, deq_v = self._dequantize(*packed)
        if self.rank > 0:
            for name, inlier, deq in (("k", inliers[0], deq_k), ("v", inliers[1], deq_v)):
                parts[f"{name}_la"], parts[f"{name}_lb"] = self._low_rank(inlier - deq)
        self._append_packed(packed)
        for key, t in parts.items():
            self.corrections[key] = t if key not in self.corrections else torch.cat([self.corrections[key], t], 2)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().dequantized()
        return self._correct(keys, "k"), self._correct(values, "v")

    def _correct(self, x: torch.Tensor, name: str) -> torch.Tensor:
        b, h, n, d = x.shape
        c = self.corrections
        if self.rank > 0:
            a = c[f"{name}_la"].view(b, h, n // self.residual, self.residual, -1)
            x = x + (a @ c[f"{name}_lb"]).view(b, h, n, d)
        flat = x.reshape(b, h, n // self.residual, self.residual * d)
        if c[f"{name}_si"].shape[-1]:
            flat = flat.scatter(-1, c[f"{name}_si"].long(), c[f"{name}_sv"])
        return flat.view(b, h, n, d)

    def reset_stats(self) -> None:
        super().reset_stats()
        self.corrections = {}

    def stats_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (*super().stats_tensors(), *self.corrections.values())


class GEAR(KIVI):
    """KIVI-style 2/4/8-bit groups + rank-r error correction + exact outliers."""

    name = "gear"
    Config = GEARConfig

    def make_cache(self, model) -> PolicyCache:
        self.check_model(model)
        n_layers, _, head_dim = kv_geometry(model)
        c = self.config
        return PolicyCache([GEARLayer(c.bits, c.residual, self._value_group(head_dim), c.rank, c.sparsity)
                            for _ in range(n_layers)])

    def update_overshoot(self, layer_idx, n_layers, past, chunk, batch, kv_heads, head_dim, elem) -> int:
        """KIVI's, plus the corrections of the dequantized past (the low-rank product and the sum it is added to,
        then the scattered outliers: the keys are held corrected while the values are: half a copy of the past more) and compressing the new groups (the inliers, their
        dequantization and the float32 SVD of the error, each the size of the tokens packed, ≤ chunk + residual)."""
        packing = dense_bytes(chunk + self.config.residual, batch, kv_heads, head_dim, 4)
        corrections = dense_bytes(past, batch, kv_heads, head_dim, elem)
        return super().update_overshoot(layer_idx, n_layers, past, chunk, batch, kv_heads, head_dim, elem) \
            + corrections // 2 + 3 * packing

    def layer_bytes(self, layer_idx, n_layers, tokens, batch, kv_heads, head_dim, elem) -> int:
        c = self.config
        groups = tokens // c.residual
        rows = batch * kv_heads
        entries = c.residual * head_dim
        k = outlier_count(entries, c.sparsity)
        outliers = k * (elem + (2 if entries < 2**15 else 4))
        low_rank = min(c.rank, c.residual, head_dim) * (c.residual + head_dim) * elem if c.rank else 0
        return super().layer_bytes(layer_idx, n_layers, tokens, batch, kv_heads, head_dim, elem) \
            + 2 * rows * groups * (outliers + low_rank)
