"""KV-cache policies: `transformers` `Cache` subclasses that evict or quantize, each with its memory estimate.

Build one by name with `memfit.kv.build_policy("h2o", budget=256)` (or `build_technique("kv", {...})`), then
`cache = policy.make_cache(model)` and `model.generate(..., past_key_values=cache)`; `cache.nbytes()` is what the
cache holds. `memfit.kv.prefill.chunked_prefill` bounds the prefill peak as well.
"""

from __future__ import annotations

from typing import Any

from memfit.kv.base import KVPolicy, PolicyCache, PolicyLayer


def build_policy(name: str, **options: Any) -> KVPolicy:
    """A KV policy by registry name with its options validated (`ConfigError` on a bad name or option)."""
    from memfit.techniques.registry import build_technique

    return build_technique("kv", {"name": name, **options})


__all__ = ["KVPolicy", "PolicyCache", "PolicyLayer", "build_policy"]
