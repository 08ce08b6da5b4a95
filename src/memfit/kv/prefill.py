"""Chunked prefill: feed a long prompt in chunks so a compressing cache bounds the prefill peak too.

A full prefill materialises keys and values (and, with eager attention, S×S probabilities) for the whole prompt
before any policy can compress them — kvpress compresses only after it (its issue #178), so its prefill peak equals
the uncompressed one. Feeding `chunk` tokens at a time lets the cache evict after every chunk: the peak holds at most
`budget + chunk` keys per layer and `chunk × (budget + chunk)` attention scores.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from memfit.compat import cache_keyword, fail
from memfit.errors import ConfigError


@torch.no_grad()
def chunked_prefill(model: nn.Module, input_ids: torch.Tensor, cache: Cache, chunk: int) -> torch.Tensor:
    """Run `input_ids` (B, S) through `model` into `cache`, `chunk` tokens per forward; return the last logits (B, V)."""
    if chunk <= 0:
        raise ConfigError(f"prefill chunk must be > 0, got {chunk}")
    if input_ids.shape[1] == 0:
        raise ConfigError("the prompt is empty: give at least one token")
    logits = None
    key = cache_keyword(model)
    before = cache.get_seq_length()
    for start in range(0, input_ids.shape[1], chunk):
        out = model(input_ids=input_ids[:, start:start + chunk], **{key: cache}, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    if cache.get_seq_length() - before != input_ids.shape[1]:
        raise fail(f"chunked prefill: the cache took {cache.get_seq_length() - before} of "
                   f"{input_ids.shape[1]} prompt tokens", f"model(..., {key}=cache) to store every key and value "
                   "in the given cache")
    return logits
