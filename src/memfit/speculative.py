"""Self-speculative decoding: the model's own first layers draft, the whole model verifies.

Elhoushi, Shrivastava, Liskovich, Hosmer, Wasti, Lai, Mahmoud, Acun, Agarwal, Roman, Aly, Chen, Wu (2024).
"LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding". ACL 2024. (Also: Zarch et al. 2024, "DEL:
Context-Aware Dynamic Exit Layer"; Liu et al. 2024, "Kangaroo: Lossless Self-Speculative Decoding via Double Early
Exiting".)

The draft is the model truncated after `draft_layers` decoder layers, followed by the model's own final norm and LM
head: the same modules (no weight is copied), so memory is one model plus the draft's KV cache (`draft_layers / L`
of the full one). Each round the draft proposes `lookahead` tokens greedily; the full model scores the last accepted
token and all proposals in one forward, keeps the longest prefix whose tokens equal its own greedy choices, and adds
its own next token — so the output is exactly greedy decoding of the full model (tested), only faster when the draft
agrees often. Both caches are cut back to the accepted tokens (`crop_to`). Greedy only; batch 1.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from memfit.compat import cache_keyword, fail
from memfit.errors import ConfigError


@dataclass
class SpeculativeResult:
    tokens: torch.Tensor  # (1, prompt + new)
    new_tokens: int
    rounds: int
    drafted: int
    accepted: int
    seconds: float
    kv_bytes: dict[str, int] = field(default_factory=dict)  # the most each cache held: "full", "draft"

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0


def draft_model(model: nn.Module, draft_layers: int) -> nn.Module:
    """A causal LM sharing `model`'s embeddings, first `draft_layers` decoder layers, final norm and LM head."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "lm_head"):
        raise ConfigError(f"self-speculative decoding needs a transformers decoder with `.model.layers` and "
                          f"`.lm_head` (Llama, Mistral, Qwen, ...); got {type(model).__name__}")
    if not 0 < draft_layers < len(layers):
        raise ConfigError(f"--draft-layers must be between 1 and {len(layers) - 1} (the model has {len(layers)} "
                          f"layers), got {draft_layers}")
    draft = copy.copy(model)  # shallow: shares every module and parameter
    draft._modules = dict(model._modules)
    draft.model = copy.copy(inner)
    draft.model._modules = dict(inner._modules)
    draft.model.layers = nn.ModuleList(list(layers)[:draft_layers])
    draft.config = copy.copy(model.config)
    draft.config.num_hidden_layers = draft_layers
    draft.model.config = draft.config
    return draft


def crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` tokens of every layer of a `DynamicCache` (transformers' `crop` changed its
    argument's meaning across releases, so memfit slices the layers itself and checks the result)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
    if cache.get_seq_length() != length:
        raise fail(f"self-speculative decoding: the cache holds {cache.get_seq_length()} tokens after cutting it to "
                   f"{length}", "DynamicCache layers with `keys`/`values` of shape (B, H, tokens, D)",
                   ("transformers",))


def _bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def self_speculative_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, draft_layers: int,
                              lookahead: int = 4) -> SpeculativeResult:
    """Greedy decoding of `model` accelerated by its own first `draft_layers` layers as the draft."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ConfigError("self-speculative decoding takes one non-empty prompt (batch 1)")
    if max_new_tokens <= 0 or lookahead <= 0:
        raise ConfigError(f"max_new_tokens and lookahead must be > 0, got {max_new_tokens} and {lookahead}")
    draft = draft_model(model, draft_layers)
    key = cache_keyword(model)
    full_cache, draft_cache = DynamicCache(), DynamicCache()
    start = time.perf_counter()
    seq = input_ids
    logits = model(input_ids=seq, **{key: full_cache}).logits[:, -1]
    seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    peaks = {"full": _bytes(full_cache), "draft": 0}
    rounds = drafted = accepted = 0
    while seq.shape[1] - input_ids.shape[1] < max_new_tokens:
        budget = max_new_tokens - (seq.shape[1] - input_ids.shape[1])
        proposals = _draft(draft, key, draft_cache, seq, min(lookahead, budget))
        peaks["draft"] = max(peaks["draft"], _bytes(draft_cache))
        known = seq.shape[1] - 1  # tokens in the full cache (the last token of `seq` is not yet in it)
        check = torch.cat([seq[:, -1:], proposals], dim=1)
        logits = model(input_ids=check, **{key: full_cache}).logits[0]
        peaks["full"] = max(peaks["full"], _bytes(full_cache))
        choice = logits.argmax(-1)  # the full model's greedy token after each position
        agree = (choice[:-1] == proposals[0]).long()
        n = int(agree.cumprod(0).sum())
        seq = torch.cat([seq, proposals[:, :n], choice[n:n + 1][None]], dim=1)
        crop_to(full_cache, known + 1 + n)
        crop_to(draft_cache, min(draft_cache.get_seq_length(), known + 1 + n))
        rounds, drafted, accepted = rounds + 1, drafted + proposals.shape[1], accepted + n
    seq = seq[:, :input_ids.shape[1] + max_new_tokens]
    return SpeculativeResult(tokens=seq, new_tokens=seq.shape[1] - input_ids.shape[1], rounds=rounds,
                             drafted=drafted, accepted=accepted, seconds=time.perf_counter() - start, kv_bytes=peaks)


def _draft(draft: nn.Module, key: str, cache: DynamicCache, seq: torch.Tensor, n: int) -> torch.Tensor:
    """`n` greedy tokens from the draft after `seq`; the draft's cache catches up on tokens it has not seen."""
    out = []
    feed = seq[:, cache.get_seq_length():]
    for _ in range(n):
        token = draft(input_ids=feed, **{key: cache}).logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        feed = token
    return torch.cat(out, dim=1)


def speculative_kv_bytes(model: nn.Module, tokens: int, draft_layers: int, elem: int = 4) -> dict[str, int]:
    """KV bytes of the full model's and the draft's dense caches after `tokens` tokens (batch 1)."""
    from memfit.kv.base import dense_bytes, kv_geometry

    n_layers, kv_heads, head_dim = kv_geometry(model)
    per_layer = dense_bytes(tokens, 1, kv_heads, head_dim, elem)
    return {"full": n_layers * per_layer, "draft": draft_layers * per_layer}
