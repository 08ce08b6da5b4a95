"""The tensor peak of a forward through a KV cache, above the weights: what prefill and decoding need at most.

A forward of `c` new tokens through a layer that already stores `P` keys holds, at its worst moment: the cache
(every layer at its steady size, the current one grown by the `c` new tokens before it evicts, plus the copy
`torch.cat` makes while the old tensor is still alive), the residual stream, and the larger of the attention and
MLP temporaries of that layer:

- eager attention: q·kᵀ scores in float32 for every query head, c·n_h·K·4 with K = P + c keys, twice (the
  masked scores and the softmax are built from the one before), the additive mask c·K·4, and keys/values
  repeated to every query head under GQA, 2·n_h·K·d·e;
- sdpa: q, k, v, keys/values repeated under GQA (transformers repeats them unless the kernel takes GQA), the
  output, a boolean mask c·K and the fused kernel's blocks of scores (no c × K scores at once);
  A policy that ranks tokens builds `score_copies` more such tensors while the probabilities are alive;
- MLP: gate, up, act(gate) and their product, 3·c·I·e at once (the fourth is built as the first is freed).

Prefill of an S-token prompt in chunks of `c` peaks at its last chunk (every term grows with the tokens seen or
stays flat once a budgeted cache is full), so `prefill_peak` evaluates that chunk; decoding is the same forward with
c = 1 plus the float32 logits over the vocabulary. A one-forward prefill of an evicting policy with eager attention
is the S² term that chunking removes: `auto_chunk` picks the chunk from the budget so the chunk's scores cost no
more than the cache they are bounded to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memfit.memory.spec import DTYPE_BYTES, RunSpec

if TYPE_CHECKING:
    from memfit.kv.base import KVPolicy

MIN_CHUNK = 16
MAX_CHUNK = 1024


def forward_transient(spec: RunSpec, chunk: int, keys: int, attn: str, score_copies: int = 0) -> int:
    """Bytes of one layer's temporaries for `chunk` queries over `keys` keys (see the module docstring);
    `score_copies`: float32 tensors of the probabilities' size a policy builds while it ranks (eager only)."""
    m = spec.model
    e = DTYPE_BYTES[spec.compute_dtype]
    stream = chunk * m.hidden * (4 + 2 * e)  # residual (fp32 norm input), normed input, block output
    qkv = chunk * (2 * m.n_heads + 2 * m.n_kv_heads) * m.head_dim * e  # q, k, v and rotated q/k
    repeated = 2 * m.n_heads * keys * m.head_dim * e if m.n_heads != m.n_kv_heads else 0
    if attn == "eager":
        scores = chunk * m.n_heads * keys * 4
        attention = qkv + repeated + max(2 * scores + chunk * keys * 4, (1 + score_copies) * scores)
    else:  # + the fused kernel's blocks of scores (CPU flash: up to 256 queries × 512 keys, fp32, and their exp)
        blocks = 2 * min(chunk, 256) * min(keys, 512) * 4
        attention = qkv + repeated + chunk * m.n_heads * m.head_dim * e + chunk * keys + blocks
    mlp = 3 * chunk * m.intermediate * e
    return stream + max(attention, mlp)


def _stored(policy: KVPolicy, layer: int, n_layers: int, tokens: int) -> int:
    budget = policy.budget_of(layer, n_layers)
    return tokens if budget is None else min(tokens, budget)


def cached_forward_peak(policy: KVPolicy, spec: RunSpec, before: int, chunk: int, attn: str) -> int:
    """Tensor bytes above the weights at the worst moment of a forward of `chunk` tokens after `before` tokens."""
    m = spec.model
    e = DTYPE_BYTES[spec.compute_dtype]
    after = before + chunk
    cache = policy.kv_bytes(spec, tokens=after)
    worst = 0
    for layer in range(m.n_layers):
        past = _stored(policy, layer, m.n_layers, before)
        keys = past + chunk
        grown = policy.update_overshoot(layer, m.n_layers, past, chunk, spec.batch, m.n_kv_heads, m.head_dim, e)
        transient = forward_transient(spec, chunk, keys, attn, policy.score_copies)
        worst = max(worst, grown + spec.batch * transient)
    return cache + worst


def prefill_peak(policy: KVPolicy, spec: RunSpec, prompt_tokens: int, chunk: int | None, attn: str) -> int:
    """Bytes above the weights at the peak of prefilling `prompt_tokens` tokens `chunk` at a time (None: one
    forward). The logits of the last position only (`logits_to_keep=1`) are negligible and left out."""
    if prompt_tokens <= 0:
        return 0
    chunk = prompt_tokens if not chunk else min(chunk, prompt_tokens)
    last = (prompt_tokens - 1) % chunk + 1
    peaks = [cached_forward_peak(policy, spec, prompt_tokens - last, last, attn)]
    if last != chunk:  # the last full chunk may have more queries than the short tail
        peaks.append(cached_forward_peak(policy, spec, prompt_tokens - last - chunk, chunk, attn))
    return max(peaks)


def decode_peak(policy: KVPolicy, spec: RunSpec, total_tokens: int, attn: str) -> int:
    """Bytes above the weights at the peak of a decode step that ends with `total_tokens` tokens seen, plus the
    float32 logits (and their processed copy) over the vocabulary and `generate`'s int64 token ids and attention
    mask, each copied by the `torch.cat` that appends a token."""
    bookkeeping = 2 * spec.batch * spec.model.vocab * 4 + 4 * spec.batch * (total_tokens + 1) * 8
    return cached_forward_peak(policy, spec, total_tokens - 1, 1, attn) + bookkeeping


def auto_chunk(policy: KVPolicy, spec: RunSpec, attn: str) -> int | None:
    """The prefill chunk for a compressing policy: as large as the budget (a power of two, 16 … 1024) while one
    chunk's eager attention scores stay within the bytes of the cache it is bounded to; None for the full cache."""
    if not policy.compresses:
        return None
    m = spec.model
    budgets = [policy.budget_of(i, m.n_layers) for i in range(m.n_layers)]
    budget = max(b for b in budgets) if all(b is not None for b in budgets) else policy.default_chunk()
    cache = policy.kv_bytes(spec, tokens=budget)
    chunk = MIN_CHUNK
    while chunk * 2 <= min(budget, MAX_CHUNK):
        nxt = chunk * 2
        if attn == "eager" and spec.batch * 2 * nxt * m.n_heads * (budget + nxt) * 4 > cache:
            break
        chunk = nxt
    return chunk
