"""`memfit plan-generate`: which weight format × KV policy fits a generation in a memory budget, predicted (and,
with `measure=True`, measured by running it).

For a model, a prompt length, a number of new tokens and a byte budget, every combination of a weight format
(fp as loaded, int8, int4, nf4: `WeightQuantTechnique.transform_spec`) and a KV policy (the full cache, the evicting
policies at `kv_share` of the context — H2O and Keyformer also with their kept tokens KIVI-quantized to 8/4/2 bits,
Ada-KV's per-head budgets — KIVI 4/2-bit, GEAR 2-bit) is predicted as the tensor peak of the whole
generation: weights + the larger of the prefill and decode peaks (`memfit.kv.peak`, KV cache included; compressing
policies prefill in chunks by default). Rows are sorted by fidelity (no eviction first, then fewer bits) and then by
peak; the first that fits is the recommendation. Weight streaming from disk is not planned here (its resident bytes
depend on the streaming schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memfit.errors import ConfigError
from memfit.memory.estimate import parameter_bytes
from memfit.memory.spec import RunSpec

WEIGHTS = (None, "int8", "int4", "nf4")
# (policy, options, fidelity rank: lower is closer to the full cache). A prior, not a measurement of this model:
# fewer bits rank lower, eviction below quantization alone, and eviction with its kept tokens KIVI-quantized
# (`kv.quantized_slots`) just below the same eviction unquantized, fewer bits lower (measured in docs/benchmarks.md:
# h2o + kivi4 within ±1 % of h2o's perplexity, + kivi2 +7 %); StreamingLLM, which keeps no heavy hitters, last.
KV_OPTIONS: tuple[tuple[str, dict[str, Any], int], ...] = (
    ("full", {}, 0), ("kivi", {"bits": 4}, 1), ("gear", {"bits": 2}, 2), ("kivi", {"bits": 2}, 3),
    ("snapkv", {"window": 16}, 4), ("h2o", {}, 4), ("keyformer", {}, 4), ("adakv", {}, 4),
    *((name, {"quant": quant}, rank) for quant, rank in (("kivi8", 5), ("kivi4", 6), ("kivi2", 7))
      for name in ("h2o", "keyformer")),
    ("streaming_llm", {}, 8),
)
BUDGETED = ("snapkv", "h2o", "keyformer", "adakv", "streaming_llm")


@dataclass
class GenerationPlan:
    weights: str
    kv: str
    kv_options: dict[str, Any]
    kv_budget: int | None
    weights_bytes: int
    prefill_peak: int  # above the weights
    decode_peak: int
    fidelity: int

    @property
    def peak(self) -> int:
        return self.weights_bytes + max(self.prefill_peak, self.decode_peak)

    def label(self) -> str:
        opts = "".join(f" {k}={v}" for k, v in self.kv_options.items())
        budget = f" budget={self.kv_budget}" if self.kv_budget else ""
        return f"weights {self.weights} · kv {self.kv}{opts}{budget}"


def plan_generation(model, prompt_tokens: int, new_tokens: int, kv_share: float = 0.2) -> list[GenerationPlan]:
    """Every weights × KV combination for `model` (a loaded transformers causal LM), predicted; best first."""
    from memfit.kv import build_policy
    from memfit.kv.base import attn_implementation
    from memfit.kv.peak import auto_chunk, decode_peak, prefill_peak
    from memfit.techniques.registry import build_technique

    if prompt_tokens <= 0 or new_tokens <= 0:
        raise ConfigError(f"--prompt-tokens and --new-tokens must be > 0, got {prompt_tokens} and {new_tokens}")
    base = RunSpec.from_model(model, batch=1, seq=prompt_tokens)
    total = prompt_tokens + new_tokens
    rows = []
    for fmt in WEIGHTS:
        spec = base if fmt is None else build_technique("weights", {"name": fmt}).transform_spec(base)
        weights = parameter_bytes(spec) + spec.model.buffers_bytes
        for name, options, fidelity in KV_OPTIONS:
            budget = max(32, round(kv_share * total)) if name in BUDGETED else None
            policy = build_policy(name, **options, **({"budget": budget} if budget else {}))
            attn = "eager" if policy.needs_attention else attn_implementation(model)
            run = spec.with_(attn_impl=attn)
            chunk = auto_chunk(policy, run, attn)
            rows.append(GenerationPlan(fmt or "fp (as loaded)", name, options, budget, weights,
                                       prefill_peak(policy, run, prompt_tokens - 1, chunk, attn),
                                       decode_peak(policy, run, total - 1, attn), fidelity))
    return sorted(rows, key=lambda r: (r.fidelity, WEIGHTS.index(None if r.weights.startswith("fp") else r.weights),
                                       r.peak))


def measure_plan(model, tokenizer, plan: GenerationPlan, prompt_tokens: int, new_tokens: int) -> int:
    """Run `plan` through `memfit generate` on a random prompt; return the measured tensor peak."""
    import torch

    from memfit.generate import generate

    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    weights = None if plan.weights.startswith("fp") else plan.weights
    result = generate(model, ids, new_tokens, tokenizer=tokenizer, kv=plan.kv, kv_budget=plan.kv_budget,
                      kv_options=plan.kv_options or None, weights=weights)
    return result.report.tensor_peak
