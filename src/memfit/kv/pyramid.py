"""Per-layer KV budgets shaped like a pyramid: more cache in the lower layers, less in the upper ones.

Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao (2024). "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling". arXiv:2406.02069. (WindowKV, Zuo et al. 2025, likewise shares one total budget
unevenly across layers.)

Lower layers attend broadly and upper layers concentrate on few tokens, so the same total cache buys more quality when
it is spent unevenly. Layer l (of L) keeps b_l tokens per head, an arithmetic progression from b_0 down to
b_{L-1} = budget / beta whose mean is `budget`, so the whole cache holds L · budget tokens per head, the same as a
uniform policy. Within a layer tokens are chosen as in SnapKV (observation window, pooled). Needs eager attention.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from memfit.kv.snapkv import SnapKV, SnapKVConfig


class PyramidConfig(SnapKVConfig):
    name: str = "pyramid"
    beta: float = Field(20.0, gt=1, description="the top layer keeps budget/beta tokens (at least window + 1)")

    @model_validator(mode="after")
    def _layers_fit(self):
        if self.budget < self.window + 1:
            raise ValueError(f"budget ({self.budget}) must exceed window ({self.window})")
        return self


def pyramid_budgets(n_layers: int, budget: int, beta: float, minimum: int) -> list[int]:
    """Per-layer budgets, decreasing linearly, each ≥ `minimum`, summing to exactly `n_layers · budget`."""
    if n_layers == 1:
        return [budget]
    top = max(float(minimum), budget / beta)
    top = min(top, float(budget))
    bottom = 2 * budget - top
    raw = [bottom + (top - bottom) * i / (n_layers - 1) for i in range(n_layers)]
    out = [max(minimum, int(r)) for r in raw]
    diff = n_layers * budget - sum(out)
    i = 0
    while diff != 0:  # hand out (or take back) the rounding remainder, lower layers first
        j = i % n_layers
        step = 1 if diff > 0 else -1
        if step > 0 or out[j] > minimum:
            out[j] += step
            diff -= step
        i += 1
    return out


class PyramidKV(SnapKV):
    """SnapKV selection with pyramid per-layer budgets; `budget` is the mean per layer and head."""

    name = "pyramid"
    Config = PyramidConfig

    def budget_of(self, layer_idx: int, n_layers: int) -> int:
        c = self.config
        return pyramid_budgets(n_layers, c.budget, c.beta, c.window + 1)[layer_idx]
