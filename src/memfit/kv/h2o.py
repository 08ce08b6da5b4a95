"""H2O: keep the recent tokens and the "heavy hitters" that have received the most attention.

Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen (2023). "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models". NeurIPS 2023.

Each KV head accumulates, for every cached token, the attention probability it has received from every query so far
(summed over the query heads that share it under GQA). After each forward the layer keeps the last
`recent_ratio · budget` tokens plus the best-scored others: exactly `budget` tokens per layer and head, whatever the
generation length. The paper reports that a 20 % cache (half heavy hitters, half recent) keeps quality on
OPT/LLaMA/GPT-NeoX. Needs attention probabilities, so the model must run with eager attention.
"""

from __future__ import annotations

from pydantic import Field

from memfit.kv.accumulated import AccumulatedConfig, AccumulatedScoreLayer, AccumulatedScorePolicy
from memfit.kv.base import PolicyLayer
from memfit.kv.quantized_slots import QuantizedScoreLayer


class H2OConfig(AccumulatedConfig):
    name: str = "h2o"
    recent_ratio: float = Field(0.5, ge=0, le=1, description="share of the budget kept for the most recent tokens")


class H2O(AccumulatedScorePolicy):
    """Heavy hitters (accumulated attention) + recent window; `budget` tokens per layer and head."""

    name = "h2o"
    Config = H2OConfig

    def make_layer(self, layer_idx: int, n_layers: int) -> PolicyLayer:
        return self.scored_layer(AccumulatedScoreLayer, QuantizedScoreLayer)
