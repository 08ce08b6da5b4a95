"""Prefill and decode peaks: bounded by default for every compressing policy, and equal to `memfit.kv.peak`'s
estimate within its margin (an upper bound, at most 1.5× the measured bytes above the weights)."""

import pytest
import torch

from memfit.generate import generate
from memfit.kv import build_policy
from memfit.kv.peak import auto_chunk
from memfit.memory.spec import RunSpec


@pytest.fixture(scope="module")
def long_prompt():
    return torch.randint(0, 256, (1, 2048), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kv, options", [("h2o", {}), ("snapkv", {"window": 16})])
def test_2k_prompt_prefill_is_bounded_without_flags(model, long_prompt, kv, options):
    """No --prefill-chunk: the policy prefills in chunks chosen from its budget, and the measured prefill peak is
    a small fraction of the one-forward prefill (eager attention's 2048² scores), within its estimate."""
    auto = generate(model, long_prompt, 2, kv=kv, kv_budget="10%", kv_options=options)
    once = generate(model, long_prompt, 2, kv=kv, kv_budget="10%", kv_options=options, prefill_chunk=0)
    assert auto.prefill_chunk is not None and once.prefill_chunk is None
    assert auto.peaks["prefill"] < once.peaks["prefill"] / 10, (auto.peaks, once.peaks)
    for result in (auto, once):
        assert result.peaks["prefill"] <= result.peak_estimates["prefill"] <= 1.5 * result.peaks["prefill"]
        assert result.peaks["decode"] <= result.peak_estimates["decode"] <= 1.5 * result.peaks["decode"]
    assert auto.memory.kv_cache == auto.kv_estimate


@pytest.mark.parametrize("kv, budget, options", [
    ("full", None, {}), ("gear", None, {"bits": 2, "rank": 4, "residual": 16}), ("streaming_llm", 40, {}), ("keyformer", 40, {}), ("pyramid", 40, {"window": 8}),
    ("kivi", None, {"bits": 2}), ("kivi", 64, {"bits": 4, "residual": 16}), ("gear", None, {"bits": 2, "rank": 2}),
    ("h2o", 64, {"quant": "kivi4"}), ("adakv", 40, {}),
])
def test_measured_peaks_within_the_estimate(model, kv, budget, options):
    prompt = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(1))
    if kv == "keyformer":  # its Gumbel scoring is the largest temporary at a chunk of 64 over 4 heads
        options = {**options}
        budget = 128
    result = generate(model, prompt, 4, kv=kv, kv_budget=budget, kv_options=options)
    assert (result.prefill_chunk is None) == (kv == "full")
    # GEAR's estimate counts its correction temporaries at their largest overlap; on llama-tiny (head_dim 16) that
    # bound is loose (1.6×; 1.09× on the 4-layer bench model, docs/benchmarks.md)
    slack = 1.75 if kv == "gear" else 1.5
    for phase in ("prefill", "decode"):
        assert result.peaks[phase] <= result.peak_estimates[phase] <= slack * result.peaks[phase], (
            phase, result.peaks, result.peak_estimates)


def test_auto_chunk_follows_the_budget():
    """The largest power of two ≤ the budget whose eager scores (2 · chunk · heads · (budget + chunk) · 4 bytes)
    fit in the cache's bytes at that budget; no chunk for the full cache; sdpa has no scores to bound."""
    from memfit.models import build_llama

    spec = RunSpec.from_model(build_llama("llama-1m", 256), attn_impl="eager")
    assert auto_chunk(build_policy("full"), spec, "eager") is None
    for budget in (20, 32, 100, 4096):
        policy = build_policy("h2o", budget=budget)
        chunk = auto_chunk(policy, spec, "eager")
        scores = lambda c: 2 * c * 4 * (budget + c) * 4  # noqa: E731 - llama-1m: 4 heads
        assert chunk & (chunk - 1) == 0 and 16 <= chunk <= max(16, budget)
        assert chunk == 16 or scores(chunk) <= policy.kv_bytes(spec, tokens=budget)
        assert 2 * chunk > budget or scores(2 * chunk) > policy.kv_bytes(spec, tokens=budget)
    assert auto_chunk(build_policy("h2o", budget=32), spec, "eager") == 32
    assert auto_chunk(build_policy("streaming_llm", budget=4096), spec, "sdpa") == 1024


def test_negative_prefill_chunk_is_refused(model, prompt):
    from memfit.errors import ConfigError

    with pytest.raises(ConfigError, match="prefill-chunk"):
        generate(model, prompt, 2, kv="h2o", kv_budget=8, prefill_chunk=-1)


def test_adakv_peaks_within_the_estimate_on_a_second_shape():
    """Ada-KV's padded view and grown pool are not alive at once (its `update_overshoot`): the estimate stays an
    upper bound within 1.5× on llama-1m (4 KV heads, no GQA) as on llama-tiny above."""
    from memfit.models import build_llama

    lm = build_llama("llama-1m", 256, seed=0).eval()
    lm.set_attn_implementation("eager")
    prompt = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(1))
    result = generate(lm, prompt, 4, kv="adakv", kv_budget=60)
    for phase in ("prefill", "decode"):
        assert result.peaks[phase] <= result.peak_estimates[phase] <= 1.5 * result.peaks[phase], (
            phase, result.peaks, result.peak_estimates)
