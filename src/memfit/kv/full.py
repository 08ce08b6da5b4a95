"""The uncompressed KV cache as a memfit policy: the baseline every other policy is measured against.

It keeps every key and value (like `transformers.DynamicCache`) and reports its bytes, so `memfit generate` measures
and estimates the KV cache the same way whatever the policy.
"""

from __future__ import annotations

from memfit.kv.base import KVPolicy, PolicyLayer, dense_bytes
from memfit.techniques.base import TechniqueConfig


class FullConfig(TechniqueConfig):
    name: str = "full"


class FullLayer(PolicyLayer):
    def __init__(self) -> None:
        super().__init__(budget=None)


class FullKV(KVPolicy):
    """Keep everything: KV bytes = 2·layers·kv_heads·head_dim·tokens·bytes."""

    name = "full"
    Config = FullConfig
    compresses = False

    def make_layer(self, layer_idx: int, n_layers: int) -> PolicyLayer:
        return FullLayer()

    def layer_bytes(self, layer_idx, n_layers, tokens, batch, kv_heads, head_dim, elem) -> int:
        return dense_bytes(tokens, batch, kv_heads, head_dim, elem)
