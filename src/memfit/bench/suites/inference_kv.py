"""`memfit bench inference` sections on the KV side of `memfit generate` (issue 16):

- `peaks`: for a long prompt, every policy through `memfit.generate.generate` with no flags beyond the budget:
  the prefill chunk it chose, prefill and decode tensor peaks above the weights (measured by `MemoryMeter`, and
  `memfit.kv.peak`'s estimates), and the most the cache held next to its estimate; plus the one-forward prefill
  (`--prefill-chunk 0`) for h2o, the unbounded case the default removed.
- `speed`: decode tokens per CPU second through `model.generate` of memfit's evicting caches vs transformers'
  `DynamicSlidingWindowLayer` cache attending to the same number of keys (budget + 1), interleaved, best of `reps`
  (process time: the machine is shared, wall time is noise).
- `speculative`: self-speculative decoding vs plain greedy (same output, checked), acceptance and speedup.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from memfit.kv import build_policy

PEAK_CASES: list[tuple[str, str | None, dict[str, Any], dict[str, Any]]] = [
    ("full", None, {}, {}),
    ("streaming_llm", "10%", {}, {}),
    ("h2o", "10%", {}, {}),
    ("h2o", "10%", {}, {"prefill_chunk": 0}),
    ("snapkv", "10%", {"window": 16}, {}),
    ("keyformer", "10%", {}, {}),
    ("pyramid", "10%", {"window": 16}, {}),
    ("kivi", None, {"bits": 4}, {}),
    ("kivi", "10%", {"bits": 4}, {}),
    ("gear", None, {"bits": 2, "rank": 4}, {}),
    ("h2o", "256KiB", {}, {}),
    ("h2o", "10%", {"quant": "kivi4"}, {}),
    ("h2o", "256KiB", {"quant": "kivi4"}, {}),
    ("adakv", "10%", {}, {}),
]


def peak_rows(path: Path, length: int, new_tokens: int = 16) -> list[dict]:
    from memfit.generate import generate, load_causal_lm

    models = {impl: load_causal_lm(path, impl)[0] for impl in ("sdpa", "eager")}
    ids = torch.randint(0, models["sdpa"].config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    rows = []
    for kv, budget, options, extra in PEAK_CASES:
        needs_eager = kv in ("h2o", "snapkv", "keyformer", "pyramid", "adakv")
        model = models["eager" if needs_eager else "sdpa"]
        r = generate(model, ids, new_tokens, kv=kv, kv_budget=budget, kv_options=options, **extra)
        label = kv + (f" {'+'.join(f'{k}={v}' for k, v in options.items())}" if options else "")
        rows.append({"section": "peaks", "method": label, "source": "memfit", "budget": budget or "-",
                     "budget_tokens": r.options.get("budget"), "attn": r.options["attn"], "prompt": length,
                     "prefill_chunk": r.prefill_chunk or "one forward",
                     "prefill_peak": r.peaks.get("prefill"), "prefill_est": r.peak_estimates.get("prefill"),
                     "decode_peak": r.peaks["decode"], "decode_est": r.peak_estimates["decode"],
                     "kv_held": r.memory.kv_cache, "kv_est": r.kv_estimate})
    return rows


def _decode_rate(model, make_cache, ids: torch.Tensor, n: int) -> float:
    from memfit.compat import cache_keyword
    from memfit.kv.prefill import chunked_prefill

    cache = make_cache()
    with torch.no_grad():
        chunked_prefill(model, ids[:, :-1], cache, 128)
        start = time.process_time()
        model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       attention_mask=torch.ones_like(ids), pad_token_id=0)
        return (n - 1) / (time.process_time() - start)


def speed_rows(path: Path, prompt: int = 512, budget: int = 256, new_tokens: int = 96, reps: int = 3) -> list[dict]:
    from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

    from memfit.generate import load_causal_lm

    rows = []
    for impl, names in (("sdpa", ["streaming_llm"]), ("eager", ["streaming_llm", "h2o", "keyformer", "adakv"])):
        model = load_causal_lm(path, impl)[0]
        ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
        n_layers = model.config.num_hidden_layers
        makers = {"transformers sliding window": lambda: Cache(
            layers=[DynamicSlidingWindowLayer(budget + 1) for _ in range(n_layers)])}
        for name in names:
            makers[name] = lambda name=name: build_policy(name, budget=budget).make_cache(model)
        rates: dict[str, list[float]] = {k: [] for k in makers}
        for rep in range(reps):
            for key in (list(makers) if rep % 2 == 0 else list(makers)[::-1]):
                rates[key].append(_decode_rate(model, makers[key], ids, new_tokens))
        ref = max(rates["transformers sliding window"])
        for key, r in rates.items():
            rows.append({"section": "speed", "method": f"{key} ({impl})", "source": "memfit" if key in names
                         else "transformers", "budget_tokens": budget, "prompt": prompt,
                         "decode_tok_per_cpu_s": max(r), "vs_sliding_window": max(r) / ref})
    return rows


def speculative_rows(path: Path, prompt: int = 64, new_tokens: int = 128) -> list[dict]:
    from memfit.generate import load_causal_lm
    from memfit.speculative import self_speculative_generate

    model = load_causal_lm(path, "sdpa")[0]
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    start = time.process_time()
    ref = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         attention_mask=torch.ones_like(ids), pad_token_id=0)
    greedy_s = time.process_time() - start
    rows = []
    layers = model.config.num_hidden_layers
    for draft_layers in range(1, layers):
        for lookahead in (2, 4):
            start = time.process_time()
            r = self_speculative_generate(model, ids, new_tokens, draft_layers, lookahead)
            seconds = time.process_time() - start
            rows.append({"section": "speculative", "method": f"draft {draft_layers}/{layers} layers, lookahead "
                         f"{lookahead}", "source": "memfit", "identical_to_greedy": bool(torch.equal(r.tokens, ref)),
                         "acceptance": r.acceptance, "tokens_per_round": r.tokens_per_round,
                         "speedup_vs_greedy": greedy_s / seconds, "kv_full": r.kv_bytes["full"],
                         "kv_draft": r.kv_bytes["draft"]})
    return rows
