"""Shared machinery of memfit's KV-cache policies: a `transformers` `Cache` whose layers evict or compress.

Every policy is a `PolicyCache` (a `transformers.Cache`) made of one `PolicyLayer` per decoder layer, so it plugs
into `model(..., past_key_values=cache)` and `model.generate(past_key_values=cache)` unchanged (`cache=` from
transformers 5.24; `memfit.compat.cache_keyword` names the one a model takes).

How positions stay correct after eviction. Llama-family models apply rotary embeddings *before* keys reach the
cache, so each cached key already carries the rotation of its original absolute position. A layer remembers how many
tokens it has seen (`seen`) apart from how many it still stores; `get_seq_length()` returns `seen`, so the model
numbers the next query `seen` (its true position) and every query-key dot product keeps its true relative distance,
however many keys were evicted in between. `get_mask_sizes()` returns (stored + new, seen - stored): every stored
key is in the past of the new queries, and the new keys are masked causally among themselves, so chunked prefill on
a compressed cache is exact too. (StreamingLLM's paper instead re-numbers positions inside the cache to stay within a
model's trained length; with true positions the model sees the same distances it was trained on while the text fits
its context, which is what memfit's tests check.)

Policies that rank tokens by attention (H2O, SnapKV, Keyformer, pyramid budgets) read the attention probabilities the
model computes anyway: a forward hook on every attention module hands them to the layer, which then evicts. Only
`eager` attention returns them; with `sdpa` / flash the policy raises a `ConfigError` saying to use eager. The hooks
find the cache by type, not by argument name, and the cache refuses to run when they did not act (every layer's
`update` must follow its module's pre-hook; an attention-ranked layer must see its attention; after every forward
no layer holds more than its budget): a `CompatError` naming the versions, never a silently full cache.

Limits: batches must be unpadded (a 2-D padding mask is indexed by absolute position, which no longer matches the
kept keys after eviction); beam search and `crop` (assisted decoding) are refused, since evicted keys are gone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from memfit.compat import fail, find_instance
from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import DTYPE_BYTES, RunSpec
from memfit.techniques.base import Context, Technique, TechniqueConfig

SCORE_BYTES = 4  # per-token scores are kept in float32 whatever the cache dtype


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep the tokens `idx` (B, H, K) of `x` (B, H, L, ...) along dim 2, per batch row and head."""
    index = idx.view(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
    return x.gather(2, index)


def keep_top(scores: torch.Tensor, budget: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (B, H, budget), ascending, of the `protected` tokens (a mask broadcastable to `scores`) plus the
    best-scored others."""
    if protected is not None:
        scores = scores.masked_fill(protected, float("inf"))
    idx = scores.topk(budget, dim=-1).indices
    return idx.sort(dim=-1).values


def keep_recent_and_top(scores: torch.Tensor, budget: int, recent: int) -> torch.Tensor:
    """Indices (B, H, budget), ascending, of the `recent` last tokens plus the best-scored others."""
    n = scores.shape[-1]
    return keep_top(scores, budget, torch.arange(n, device=scores.device) >= n - recent if recent > 0 else None)


class PolicyLayer(DynamicLayer):
    """One decoder layer's cache: keys/values (B, H_kv, stored, D) plus the count of tokens seen.

    Subclasses choose which tokens to keep (`select`) and, when `needs_attention`, how attention updates their
    per-token statistics (`observe_attention`). Evicting layers keep the order of the tokens they keep, so the last
    entries are always the most recent tokens.
    """

    needs_attention: ClassVar[bool] = False
    is_croppable = False

    def __init__(self, budget: int | None = None) -> None:
        super().__init__()
        self.budget = budget
        self.seen = 0

    # --- transformers' layer API -----------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store new (post-rotary) keys and values; `seen` counts every token ever appended."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.append(key_states, value_states)
        self.on_append(key_states.shape[-2])
        keys, values = self.keys, self.values
        if not self.needs_attention:
            self.evict()  # the attention of this step still sees `keys, values` returned below
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.reset_stats()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} evicts tokens and cannot be rolled back")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support beam search; use greedy or sampling")

    # --- policy hooks ----------------------------------------------------------------------------
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def stored(self) -> int:
        return 0 if self.keys is None or self.keys.dim() < 4 else self.keys.shape[-2]

    def on_append(self, n: int) -> None:
        """New tokens were appended (grow per-token statistics)."""

    def observe_attention(self, probs: torch.Tensor) -> None:
        """`probs`: (B, H_kv, group, q, stored) attention probabilities of this step's queries; then evict."""
        self.evict()

    def select(self, budget: int) -> torch.Tensor:
        """Indices (B, H_kv, budget), ascending, of the tokens to keep."""
        raise NotImplementedError

    def evict(self) -> None:
        if self.budget is None or self.stored <= self.budget:
            return
        idx = self.select(self.budget)
        self.keys = gather_tokens(self.keys, idx)
        self.values = gather_tokens(self.values, idx)
        self.gather_stats(idx)

    def gather_stats(self, idx: torch.Tensor) -> None:
        """Keep per-token statistics in step with the kept tokens."""

    def reset_stats(self) -> None:
        pass

    def stats_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return ()

    def nbytes(self) -> int:
        """Bytes this layer holds right now: keys, values and any per-token statistics."""
        return tensor_bytes(self.keys, self.values, *self.stats_tensors())


class PolicyCache(Cache):
    """A `transformers.Cache` of `PolicyLayer`s, one per decoder layer, that reports its own bytes.

    `hooked`: the policy attached attention hooks (`attach`) and this cache refuses to run without them: every
    layer's `update` must follow its attention module's pre-hook in the same forward, and an attention-ranked layer
    must have received its attention probabilities before its next update (see `verify`).
    """

    def __init__(self, layers: list[PolicyLayer], hooked: bool = False) -> None:
        super().__init__(layers=layers)
        self.hooked = hooked
        self._armed: set[int] = set()  # layers whose attention pre-hook ran and whose update has not yet come
        self._awaiting: set[int] = set()  # attention-ranked layers updated but not yet shown their attention
        self.shared: Any = None  # state the layers share across the model (`AccumulatedScoreLayer.evict_together`)

    @property
    def needs_attention(self) -> bool:
        return any(layer.needs_attention for layer in self.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any):
        if self.hooked:
            if layer_idx not in self._armed:
                raise hooks_missed(self, layer_idx, "its attention module's forward pre-hook did not run")
            self._armed.discard(layer_idx)
            if layer_idx in self._awaiting:
                raise hooks_missed(self, layer_idx, "its attention probabilities never reached the cache")
            if self.layers[layer_idx].needs_attention:
                self._awaiting.add(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def after_forward(self) -> None:
        """After every forward of the model: work the layers deferred to run once for all of them."""
        together = getattr(type(self.layers[0]), "evict_together", None) if self.layers else None
        if together is not None:
            together(self)

    def verify(self) -> None:
        """After a forward: every attention-ranked layer saw its attention and no layer holds more than its budget."""
        if self.hooked and self._awaiting:
            raise hooks_missed(self, min(self._awaiting), "its attention probabilities never reached the cache")
        for i, layer in enumerate(self.layers):
            if layer.budget is not None and layer.stored > layer.budget:
                raise hooks_missed(self, i, f"it holds {layer.stored} tokens at a budget of {layer.budget}")

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # Layers may store different lengths (per-layer budgets); the mask is built once for all layers at the
        # longest one, and the attention pre-hook trims it to each layer's own length.
        longest = max(range(len(self.layers)), key=lambda i: self.layers[i].stored)
        return self.layers[longest].get_mask_sizes(query_length)

    def nbytes(self) -> int:
        """Bytes the cache holds right now (all layers, all tensors)."""
        return sum(layer.nbytes() for layer in self.layers)

    def stored_lengths(self) -> list[int]:
        return [layer.stored for layer in self.layers]


def hooks_missed(cache: PolicyCache, layer_idx: int, what: str) -> Exception:
    """The loud failure of a policy cache whose attention hooks did not act on layer `layer_idx`."""
    policy = type(cache.layers[layer_idx]).__name__
    return fail(f"KV policy layer {layer_idx} ({policy}) did not evict: {what}",
                "every decoder attention module (class name ending in 'Attention', with an integer `layer_idx`) to "
                "be called with the cache as a keyword argument and, for attention-ranked policies under eager "
                "attention, to return its attention probabilities as the second output", ("transformers", "torch"))


# --- attention hooks ---------------------------------------------------------------------------------

def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
            and type(m).__name__.endswith("Attention")]


def find_cache(args: tuple, kwargs: dict) -> PolicyCache | None:
    """The `PolicyCache` passed to a module call, whatever the argument is named (`compat.find_instance`); the
    two names transformers has used are looked up first (this runs twice per layer and decode step)."""
    for key in ("past_key_values", "cache", "past_key_value"):
        value = kwargs.get(key)
        if isinstance(value, PolicyCache):
            return value
    return find_instance(args, kwargs, PolicyCache)


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    cache = find_cache(args, kwargs)
    if cache is None:
        return None
    cache._armed.add(module.layer_idx)
    layer = cache.layers[module.layer_idx]
    mask = kwargs.get("attention_mask")
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    bias = None
    if hasattr(layer, "attention_bias"):  # per-head lengths (AdaKV): mask each head's padding
        dtype = mask.dtype if isinstance(mask, torch.Tensor) and mask.is_floating_point() else hidden.dtype
        bias = layer.attention_bias(hidden.shape[1], dtype, getattr(module, "num_key_value_groups", 1))
        if bias is not None and not (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4
                                                       and mask.is_floating_point())):
            raise ConfigError(f"KV policy {type(layer).__name__} needs an additive float attention mask "
                              "(eager attention)")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        if bias is None:
            return None
        kwargs["attention_mask"] = bias  # no mask (one query): only the padding to hide
        return args, kwargs
    kv_len = layer.stored + hidden.shape[1]
    if mask.shape[-1] == kv_len and bias is None:
        return None
    # The shared mask was sized for the longest layer: all stored keys are past keys (visible), and the last
    # `q` columns are the causal block of the new tokens, so a shorter layer keeps the last `kv_len` columns.
    kwargs["attention_mask"] = mask[..., -kv_len:] if bias is None else mask[..., -kv_len:] + bias
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    cache = find_cache(args, kwargs)
    if cache is None:
        return
    layer = cache.layers[module.layer_idx]
    if not layer.needs_attention:
        return
    probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if probs is None:
        raise ConfigError(f"KV policy {type(layer).__name__} ranks tokens by attention probabilities, which "
                          "this attention implementation does not return; load the model with "
                          "attn_implementation='eager' (memfit generate --attn eager)")
    b, h_q, q, k = probs.shape
    h_kv = layer.kv_heads()
    if probs.requires_grad:
        probs = probs.detach()
    if probs.dtype != torch.float32:
        probs = probs.float()
    layer.observe_attention(probs.view(b, h_kv, h_q // h_kv, q, k))
    cache._awaiting.discard(module.layer_idx)


def _model_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    cache = find_cache(args, kwargs)
    if cache is not None:
        cache.after_forward()
        cache.verify()


def attach(model: nn.Module) -> None:
    """Install (once) the hooks that let policy caches see attention and per-layer lengths, and the check after
    every forward of `model` that they acted (`PolicyCache.verify`)."""
    if getattr(model, "_memfit_kv_hooks", False):
        return
    modules = _attention_modules(model)
    if not modules:
        raise ConfigError(f"{type(model).__name__}: no attention modules with a `layer_idx` found; memfit's KV "
                          "policies need a transformers decoder model (Llama, Mistral, Qwen, ...)")
    handles = {"pre": [m.register_forward_pre_hook(_pre_hook, with_kwargs=True) for m in modules],
               "post": [m.register_forward_hook(_post_hook, with_kwargs=True) for m in modules],
               "model": [model.register_forward_hook(_model_post_hook, with_kwargs=True)]}
    model._memfit_kv_hooks = handles


def attn_implementation(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def kv_geometry(model_or_config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers causal LM or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


# --- the technique side ------------------------------------------------------------------------------

class BudgetConfig(TechniqueConfig):
    budget: int = Field(gt=0, description="KV entries kept per layer and head (tokens)")


class KVPolicy(Technique):
    """A `kv`-slot technique: builds its `PolicyCache` for a model and estimates its bytes."""

    slot = "kv"
    needs_attention: ClassVar[bool] = False
    compresses: ClassVar[bool] = True  # evicts or quantizes: prefill runs in chunks by default (`kv.peak.auto_chunk`)
    score_copies: ClassVar[int] = 0  # float32 tensors of the attention probabilities' size built to rank tokens

    def check(self, ctx: Context) -> None:
        self.check_model(ctx.model)

    def check_model(self, model: nn.Module) -> None:
        impl = attn_implementation(model)
        if self.needs_attention and impl != "eager":
            raise ConfigError(f"KV policy '{self.name}' ranks tokens by attention probabilities, which "
                              f"attn_implementation='{impl}' does not return; load the model with "
                              "attn_implementation='eager' (memfit generate --attn eager)")

    def apply(self, ctx: Context) -> None:
        attach(ctx.model)

    def make_cache(self, model: nn.Module) -> PolicyCache:
        """A fresh cache for one generation with `model` (hooks installed)."""
        self.check_model(model)
        attach(model)
        n_layers, _, _ = kv_geometry(model)
        return PolicyCache([self.make_layer(i, n_layers) for i in range(n_layers)], hooked=True)

    def make_layer(self, layer_idx: int, n_layers: int) -> PolicyLayer:
        raise NotImplementedError

    # --- estimates -------------------------------------------------------------------------------
    def layer_bytes(self, layer_idx: int, n_layers: int, tokens: int, batch: int, kv_heads: int, head_dim: int,
                    elem: int) -> int:
        """Bytes one layer holds after `tokens` tokens went through it."""
        raise NotImplementedError

    def kv_bytes(self, spec: RunSpec, tokens: int | None = None) -> int:
        m = spec.model
        tokens = spec.seq if tokens is None else tokens
        elem = DTYPE_BYTES[spec.compute_dtype]
        return sum(self.layer_bytes(i, m.n_layers, tokens, spec.batch, m.n_kv_heads, m.head_dim, elem)
                   for i in range(m.n_layers))

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        return base.with_(kv_cache=self.kv_bytes(spec))

    def budget_of(self, layer_idx: int, n_layers: int) -> int | None:
        """Tokens layer `layer_idx` keeps per head (None: all of them)."""
        return getattr(self.config, "budget", None)

    def default_chunk(self) -> int:
        """Prefill chunk of a compressing policy without a token budget (`kv.peak.auto_chunk`)."""
        return 256

    def update_overshoot(self, layer_idx: int, n_layers: int, past: int, chunk: int, batch: int, kv_heads: int,
                         head_dim: int, elem: int) -> int:
        """Bytes the updating layer holds during its forward beyond its steady size: the `chunk` new tokens not yet
        evicted, and the copy `torch.cat` (then the eviction's gather) makes while the old tensor is alive."""
        budget = self.budget_of(layer_idx, n_layers)
        grown = past + chunk
        steady = grown if budget is None else min(grown, budget)
        return dense_bytes(2 * grown - steady, batch, kv_heads, head_dim, elem)


def dense_bytes(tokens: int, batch: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """2 (K and V) · batch · kv_heads · head_dim · tokens · bytes: one layer of an uncompressed cache."""
    return 2 * batch * kv_heads * head_dim * tokens * elem


class ObservationWindowLayer(PolicyLayer):
    """Ranks tokens by the attention the last `window` queries paid them, smoothed by 1-D pooling (SnapKV).

    `obs` (B, H_kv, ≤window, stored) float32 holds the attention rows of the most recent queries (summed over the query
    heads sharing a KV head); the queries of the window are themselves always kept.
    """

    needs_attention = True

    def __init__(self, budget: int, window: int, kernel: int, pooling: str) -> None:
        super().__init__(budget)
        self.window, self.kernel, self.pooling = window, kernel, pooling
        self.obs: torch.Tensor | None = None

    def on_append(self, n: int) -> None:
        if self.obs is not None:
            self.obs = torch.nn.functional.pad(self.obs, (0, n))  # past queries paid the new tokens nothing

    def observe_attention(self, probs: torch.Tensor) -> None:
        rows = probs.sum(dim=2)[:, :, -self.window:]
        self.obs = rows if self.obs is None else torch.cat([self.obs, rows], dim=2)[:, :, -self.window:]
        self.evict()

    def select(self, budget: int) -> torch.Tensor:
        scores = self.obs.sum(dim=2)
        if self.kernel > 1:
            b, h, n = scores.shape
            flat = scores.reshape(b * h, 1, n)
            pool = torch.nn.functional.max_pool1d if self.pooling == "max" else torch.nn.functional.avg_pool1d
            flat = pool(flat, self.kernel, stride=1, padding=self.kernel // 2)
            scores = flat[..., :n].reshape(b, h, n)
        return keep_recent_and_top(scores, budget, min(self.window, budget))

    def gather_stats(self, idx: torch.Tensor) -> None:
        self.obs = self.obs.gather(3, idx[:, :, None, :].expand(-1, -1, self.obs.shape[2], -1))

    def reset_stats(self) -> None:
        self.obs = None

    def stats_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.obs,)


def window_bytes(tokens: int, budget: int, window: int, batch: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """Keys and values of the kept tokens plus the float32 attention rows of the observation window."""
    kept = min(tokens, budget)
    return dense_bytes(kept, batch, kv_heads, head_dim, elem) + batch * kv_heads * min(window, tokens) * kept * SCORE_BYTES
