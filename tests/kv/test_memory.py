import pytest
import torch

from memfit.kv import build_policy, quant
from memfit.kv.prefill import chunked_prefill
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec

POLICIES = [
    {"name": "full"},
    {"name": "streaming_llm", "budget": 20},
    {"name": "h2o", "budget": 20},
    {"name": "keyformer", "budget": 20},
    {"name": "h2o", "budget": 20, "quant": "kivi4", "quant_residual": 4},
    {"name": "h2o", "budget": 20, "quant": "kivi8"},
    {"name": "adakv", "budget": 20},
    {"name": "adakv", "budget": 20, "scoring": "snapkv", "window": 6},
    {"name": "keyformer", "budget": 20, "quant": "kivi2", "quant_residual": 3, "quant_group": 8},
    {"name": "snapkv", "budget": 20, "window": 6},
    {"name": "pyramid", "budget": 20, "window": 6},
    {"name": "kivi", "bits": 2, "residual": 8},
    {"name": "kivi", "bits": 4, "residual": 16, "value_group": 8},
    {"name": "kivi", "bits": 8, "residual": 16},
    {"name": "kivi", "bits": 4, "residual": 8, "budget": 20},
    {"name": "gear", "bits": 2, "residual": 8, "rank": 2, "sparsity": 0.05},
    {"name": "gear", "bits": 4, "residual": 16, "rank": 0, "sparsity": 0.0},
]


@pytest.mark.parametrize("spec", POLICIES, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_measured_kv_bytes_equal_estimate(model, spec):
    """Sum of the cache's tensors == policy.estimate() after prefills and decode steps of several lengths."""
    policy = build_policy(**spec)
    cache = policy.make_cache(model)
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(0))
    run = RunSpec.from_model(model, batch=2)
    with torch.no_grad():
        for start, stop in [(0, 13), (13, 14), (14, 30), (30, 31), (31, 32), (32, 60)]:
            model(ids[:, start:stop], past_key_values=cache)
            estimate = policy.estimate(run.with_(seq=stop), MemoryBreakdown())
            assert cache.get_seq_length() == stop
            assert cache.nbytes() == estimate.kv_cache > 0


def test_budget_bytes_scale_with_budget_not_length(model):
    run = RunSpec.from_model(model, batch=1)
    h2o = build_policy("h2o", budget=64)
    assert h2o.kv_bytes(run.with_(seq=10_000)) == h2o.kv_bytes(run.with_(seq=65))  # 64 kept + the next slot
    full = build_policy("full").kv_bytes(run.with_(seq=10_000))
    assert full == 2 * 2 * 2 * 16 * 10_000 * 4  # 2·layers·kv_heads·head_dim·tokens·bytes


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_error_within_half_a_step(bits):
    x = torch.randn(3, 4, 16, 32) * torch.linspace(0.1, 10, 32)  # outlier channels
    codes, scale, lo = quant.quantize(x, bits, dim=2)
    assert codes.max() <= 2**bits - 1
    assert torch.equal(quant.unpack(quant.pack(codes, bits), bits), codes)
    assert quant.pack(codes, bits).numel() == codes.numel() * bits // 8
    err = (quant.dequantize(codes, scale, lo) - x).abs()
    assert torch.all(err <= scale / 2 + 1e-5)
    assert err.max() > 0 if bits < 8 else True


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_cache_holds_keys_per_channel_values_per_token(model, bits):
    ids = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(2))
    full = build_policy("full").make_cache(model)
    cache = build_policy("kivi", bits=bits, residual=8).make_cache(model)
    with torch.no_grad():
        model(ids, past_key_values=full)
        model(ids, past_key_values=cache)
    true_k, true_v = full.layers[0].keys, full.layers[0].values
    layer = cache.layers[0]
    assert layer.quantized == 16 and layer.keys.shape[2] == 5  # two full groups packed, 5 tokens full precision
    assert layer.kq.dtype == torch.uint8 and layer.kq.shape[-1] == 16 * bits // 8
    assert torch.equal(layer.keys, true_k[:, :, 16:]) and torch.equal(layer.values, true_v[:, :, 16:])
    keys, values = layer.dequantized()
    k_step = layer.k_scale.expand(-1, -1, -1, 8, -1).reshape(1, 2, 16, 16)  # per channel, per group of 8 tokens
    v_step = layer.v_scale.expand(-1, -1, -1, -1, 16).reshape(1, 2, 16, 16)  # per token (value_group = head_dim)
    assert torch.all((keys - true_k[:, :, :16]).abs() <= k_step / 2 + 1e-5)
    assert torch.all((values - true_v[:, :, :16]).abs() <= v_step / 2 + 1e-5)


def test_chunked_prefill_peak_below_full_prefill_peak(model):
    ids = torch.randint(0, 256, (1, 384), generator=torch.Generator().manual_seed(3))

    def peak(fn):
        meter = MemoryMeter(model)
        with meter.region():
            fn()
        return meter.report().peak.total

    full = peak(lambda: chunked_prefill(model, ids, build_policy("full").make_cache(model), chunk=384))
    chunked = peak(lambda: chunked_prefill(model, ids, build_policy("h2o", budget=32).make_cache(model), chunk=32))
    streamed = peak(lambda: chunked_prefill(model, ids, build_policy("streaming_llm", budget=32).make_cache(model),
                                            chunk=32))
    assert chunked < full / 4 and streamed < full / 4, (full, chunked, streamed)


def test_kivi_budget_evicts_whole_groups_and_keeps_the_sinks(model):
    """KIVI + StreamingLLM-style eviction: never more than `budget` tokens, the first group (sinks) kept as it
    was quantized, the newest tokens exact in the residual; without a budget the same run keeps every group."""
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(4))
    capped = build_policy("kivi", bits=4, residual=8, budget=20).make_cache(model)
    free = build_policy("kivi", bits=4, residual=8).make_cache(model)
    with torch.no_grad():
        model(ids[:, :8], past_key_values=capped)
        sinks = capped.layers[0].kq.clone()
        for cache in (capped, free):
            for t in range(8 if cache is capped else 0, 70):
                model(ids[:, t:t + 1], past_key_values=cache)
                assert cache is free or max(cache.stored_lengths()) <= 20
    layer = capped.layers[0]
    assert layer.stored == 8 + 6 and layer.quantized == 8  # 70 = 8 groups + 6: only the sinks group fits with 6
    assert torch.equal(layer.kq[:, :, :8], sinks)
    assert free.layers[0].stored == 70 and capped.nbytes() < free.nbytes() / 2


def test_byte_budget_buys_the_most_tokens_that_fit(model):
    """`--kv-budget 16KiB`: the largest token budget whose fullest cache fits; one more token would not; a 2-bit
    KIVI cache buys more tokens with the same bytes than StreamingLLM's full-precision one."""
    from memfit.kv.budget import fullest_bytes, parse_size, tokens_for_bytes

    spec = RunSpec.from_model(model)
    nbytes = parse_size("16KiB")
    assert nbytes == 16384 and parse_size("256") is None and parse_size("1.5MiB") == 1572864
    got = {}
    for name, extra in [("streaming_llm", {}), ("h2o", {}), ("snapkv", {"window": 4}),
                        ("kivi", {"bits": 2, "residual": 8})]:
        make = lambda b: build_policy(name, budget=b, **extra)  # noqa: E731
        b = tokens_for_bytes(make, spec, nbytes, name)
        assert fullest_bytes(make(b), spec, b) <= nbytes < fullest_bytes(make(b + 1), spec, b + 1)
        got[name] = b
    assert got["kivi"] > 2 * got["streaming_llm"] > 2 * got["h2o"] / 1.5
    from memfit.errors import ConfigError

    with pytest.raises(ConfigError, match="below the smallest 'snapkv' cache"):
        tokens_for_bytes(lambda b: build_policy("snapkv", budget=b, window=4), spec, 100, "snapkv")


def test_generate_with_a_byte_budget_holds_it(model):
    from memfit.generate import generate

    prompt = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(5))
    for kv, options in [("h2o", {}), ("kivi", {"bits": 4, "residual": 8})]:
        result = generate(model, prompt, 8, kv=kv, kv_budget="8KiB", kv_options=options)
        assert result.memory.kv_cache == result.kv_estimate <= 8192
        assert result.memory.kv_cache > 8192 * 0.8  # the budget is used, not just respected


def test_gear_corrects_kivi_quantization_error(model):
    """GEAR's low-rank + outlier corrections cut the 2-bit error of the same packed groups (KIVI's, when rank and
    sparsity are 0: then the two caches are identical)."""
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(6))
    caches = {name: build_policy(**spec).make_cache(model) for name, spec in {
        "full": {"name": "full"}, "kivi": {"name": "kivi", "bits": 2, "residual": 16},
        "gear": {"name": "gear", "bits": 2, "residual": 16, "rank": 4, "sparsity": 0.02},
        "gear0": {"name": "gear", "bits": 2, "residual": 16, "rank": 0, "sparsity": 0.0}}.items()}
    with torch.no_grad():
        for cache in caches.values():
            model(ids, past_key_values=cache)
    true = (caches["full"].layers[1].keys, caches["full"].layers[1].values)
    err = {name: [(d - t).norm().item() for d, t in zip(caches[name].layers[1].dequantized(), true)]
           for name in ("kivi", "gear", "gear0")}
    assert err["gear0"] == err["kivi"]
    assert all(g < 0.7 * k for g, k in zip(err["gear"], err["kivi"])), err
    assert caches["gear"].nbytes() < caches["full"].nbytes()
