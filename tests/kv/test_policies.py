import pytest
import torch

from memfit.errors import CompatError, ConfigError
from memfit.kv import build_policy
from memfit.kv import base
from memfit.kv.accumulated import AccumulatedScoreLayer
from memfit.kv.base import ObservationWindowLayer
from memfit.kv.prefill import chunked_prefill
from memfit.kv.pyramid import pyramid_budgets
from memfit.models import build_llama

EVICTING = {
    "streaming_llm": {"sinks": 2},
    "h2o": {},
    "keyformer": {},
    "snapkv": {"window": 4, "kernel": 3},
}


def greedy(model, ids, cache=None, n=24):
    return model.generate(ids, max_new_tokens=n, do_sample=False, past_key_values=cache,
                          attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("name", [*EVICTING, "pyramid", "kivi_8", "full"])
def test_matches_full_cache_when_budget_covers_sequence(model, prompt, name):
    if name == "pyramid":
        policy = build_policy("pyramid", budget=2000, window=4)  # top layer keeps 2000/20 = 100 > 48 tokens
    elif name == "kivi_8":
        policy = build_policy("kivi", bits=8, residual=64)  # nothing reaches a full group: stays exact
    elif name == "full":
        policy = build_policy("full")
    else:
        policy = build_policy(name, budget=64, **EVICTING[name])
    cache = policy.make_cache(model)
    assert torch.equal(greedy(model, prompt, cache), greedy(model, prompt))
    assert cache.get_seq_length() == prompt.shape[1] + 23


@pytest.mark.parametrize("name", [*EVICTING, "pyramid"])
def test_keeps_exactly_its_budget_per_layer_and_head(model, prompt, name):
    opts = {"window": 4} if name == "pyramid" else EVICTING[name]
    policy = build_policy(name, budget=10, **opts)
    cache = policy.make_cache(model)
    greedy(model, prompt, cache, n=40)
    budgets = pyramid_budgets(2, 10, 20.0, 5) if name == "pyramid" else [10, 10]
    in_place = name in ("streaming_llm", "h2o", "keyformer")  # + the slot the next decoded token is written to
    for layer, budget in zip(cache.layers, budgets):
        slots = budget + in_place
        assert layer.stored == budget
        assert layer.keys.shape == (1, 2, slots, 16) and layer.values.shape == (1, 2, slots, 16)
    assert cache.get_seq_length() == prompt.shape[1] + 39


def test_streaming_llm_generation_equals_full_with_sdpa_while_it_fits(sdpa_model, prompt):
    cache = build_policy("streaming_llm", budget=48).make_cache(sdpa_model)  # 24 prompt + 23 cached new tokens
    assert torch.equal(greedy(sdpa_model, prompt, cache), greedy(sdpa_model, prompt))


@pytest.mark.parametrize("chunk", [1, 5])
def test_positions_stay_true_after_eviction(model, chunk):
    """Logits with a StreamingLLM cache == a full forward whose mask shows only the kept keys, at true positions."""
    budget, sinks, n = 12, 2, 40
    seq = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))
    cache = build_policy("streaming_llm", budget=budget, sinks=sinks).make_cache(model)
    with torch.no_grad():
        got = torch.cat([model(seq[:, s:s + chunk], past_key_values=cache).logits
                         for s in range(0, n, chunk)], dim=1)
        mask = torch.zeros(1, 1, n, n, dtype=torch.bool)
        for start in range(0, n, chunk):
            past = list(range(start))
            kept = past if len(past) <= budget else past[:sinks] + past[-(budget - sinks):]
            for q in range(start, min(start + chunk, n)):
                mask[0, 0, q, kept + list(range(start, q + 1))] = True
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)  # eager adds it
        want = model(seq, attention_mask=additive, position_ids=torch.arange(n)[None]).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert cache.stored_lengths() == [budget, budget]


def _synthetic(layer, n, steps, h=2):
    """Feed `layer` tokens whose key channel 0 is their index, with attention we choose; return kept indices."""
    torch.manual_seed(0)
    for t in range(n + steps):
        q = n if t == 0 else 1
        if t > 0 and t < n:
            continue
        start = 0 if t == 0 else t
        idx = torch.arange(start, start + q, dtype=torch.float32)
        k = idx.view(1, 1, q, 1).expand(1, h, q, 16).contiguous()
        keys, _ = layer.update(k, k.clone())
        probs = torch.softmax(torch.randn(1, h, 2, q, keys.shape[2]) * 3, dim=-1)
        layer.observe_attention(probs)
        kept = layer.kept()[0] if isinstance(layer, AccumulatedScoreLayer) else layer.keys[0, :, :, 0].long()
        yield keys[0, :, :, 0].long(), probs, kept


def test_h2o_keeps_recent_plus_heaviest_accumulated(prompt):
    layer = AccumulatedScoreLayer(budget=8, recent=3)
    acc: dict[tuple[int, int], float] = {}
    for before, probs, kept in _synthetic(layer, n=6, steps=12):
        received = probs.sum(dim=(2, 3))[0]  # (h, stored-before-eviction)
        for head in range(2):
            for j, tok in enumerate(before[head].tolist()):
                acc[head, tok] = acc.get((head, tok), 0.0) + received[head, j].item()
            toks = before[head].tolist()
            if len(toks) <= 8:
                assert kept[head].tolist() == toks
                continue
            by_position = sorted(toks)  # in-place decode steps leave keys in slot order
            recent = by_position[-3:]
            heavy = sorted(by_position[:-3], key=lambda t: -acc[head, t])[:5]
            assert kept[head].tolist() == sorted(recent + heavy)
            for t in set(toks) - set(kept[head].tolist()):
                del acc[head, t]
    assert layer.scores.shape == (1, 2, 9) and layer.stored == 8  # 8 kept + the slot the next token goes to


def test_snapkv_ranks_by_observation_window():
    layer = ObservationWindowLayer(budget=7, window=2, kernel=1, pooling="max")
    rows: list[torch.Tensor] = []
    for before, probs, kept in _synthetic(layer, n=10, steps=6):
        summed = probs.sum(dim=2)[0]  # (h, q, stored)
        rows = [torch.nn.functional.pad(r, (0, summed.shape[-1] - r.shape[-1])) for r in rows]
        rows = (rows + list(summed.unbind(1)))[-2:]
        if before.shape[1] <= 7:
            continue
        score = sum(rows)
        for head in range(2):
            toks = before[head].tolist()
            order = sorted(range(len(toks) - 2), key=lambda j: -score[head, j].item())[:5]
            assert kept[head].tolist() == sorted([toks[j] for j in order] + toks[-2:])
        idx = torch.stack([torch.tensor([before[h].tolist().index(t) for t in kept[h].tolist()]) for h in range(2)])
        rows = [r.gather(1, idx) for r in rows]


def test_keyformer_is_seeded_and_differs_from_h2o(model, prompt):
    outs = []
    for _ in range(2):
        cache = build_policy("keyformer", budget=8, seed=3).make_cache(model)
        greedy(model, prompt, cache, n=8)
        outs.append([layer.keys.clone() for layer in cache.layers])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    h2o = build_policy("h2o", budget=8, recent_ratio=0.3).make_cache(model)
    greedy(model, prompt, h2o, n=8)
    assert any(not torch.equal(a, b.keys) for a, b in zip(outs[0], h2o.layers))


def test_pyramid_budgets_decrease_and_sum():
    b = pyramid_budgets(6, 100, 20.0, 9)
    assert sum(b) == 600 and b == sorted(b, reverse=True) and b[-1] >= 9 and b[0] > 100


def test_chunked_prefill_then_generate_equals_full(model, prompt):
    cache = build_policy("h2o", budget=64).make_cache(model)
    chunked_prefill(model, prompt[:, :-1], cache, chunk=5)
    assert torch.equal(greedy(model, prompt, cache), greedy(model, prompt))


@pytest.mark.parametrize("spec, match", [
    ({"name": "h2o", "budget": 0}, "budget"),
    ({"name": "streaming_llm", "budget": -3}, "budget"),
    ({"name": "snapkv", "budget": 8, "window": 8}, "window"),
    ({"name": "streaming_llm", "budget": 4, "sinks": 4}, "sinks"),
    ({"name": "kivi", "bits": 3}, "bits"),
    ({"name": "h2o", "budget": 8, "bugdet": 8}, "unknown key 'bugdet'"),
    ({"name": "nope"}, "unknown kv technique 'nope'"),
])
def test_bad_config_is_a_config_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_policy(**spec)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "keyformer", "pyramid"])
def test_attention_policies_refuse_sdpa(sdpa_model, name):
    with pytest.raises(ConfigError, match="eager"):
        build_policy(name, budget=32).make_cache(sdpa_model)


def test_kivi_rejects_head_dim_it_cannot_pack(model):
    with pytest.raises(ConfigError, match="value_group"):
        build_policy("kivi", value_group=12).make_cache(model)


@pytest.mark.parametrize("name", [*EVICTING, "pyramid", "full"])
def test_hooks_that_never_see_the_cache_fail_loudly(model, prompt, name, monkeypatch):
    """A transformers release that hands attention modules the cache in a way memfit cannot find must raise, not
    silently keep the whole cache (transformers 5.24 renamed `past_key_values` to `cache`)."""
    opts = {"window": 4} if name == "pyramid" else EVICTING.get(name, {})
    cache = build_policy(name, **({} if name == "full" else {"budget": 10}), **opts).make_cache(model)
    monkeypatch.setattr(base, "find_cache", lambda args, kwargs: None)
    with pytest.raises(CompatError, match=r"layer 0 .*pre-hook did not run.*transformers \d"):
        greedy(model, prompt, cache, n=4)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "keyformer", "pyramid"])
def test_attention_that_never_reaches_the_layer_fails_loudly(prompt, name):
    """The pre-hooks see the cache but no attention probabilities arrive: refuse at once, naming the versions."""
    model = build_llama("llama-tiny", 256, seed=0).eval()
    model.set_attn_implementation("eager")
    cache = build_policy(name, budget=10, **({"window": 4} if name in ("snapkv", "pyramid") else {})).make_cache(model)
    for handle in model._memfit_kv_hooks["post"]:
        handle.remove()
    with pytest.raises(CompatError, match=r"attention probabilities never reached the cache.*transformers \d"):
        greedy(model, prompt, cache, n=4)


def test_chunked_prefill_into_a_cache_the_model_ignores_fails_loudly(model, prompt):
    """KIVI's cache has no hooks; if the model stored its keys elsewhere, prefill must say so."""
    cache = build_policy("kivi", bits=8).make_cache(model)
    with pytest.raises(CompatError, match=r"took 0 of 23 prompt tokens.*transformers \d"):
        chunked_prefill(lambda **kw: model(**{k: v for k, v in kw.items() if k not in ("cache", "past_key_values")}),
                        prompt[:, :-1], cache, chunk=5)


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "keyformer"])
def test_decode_steps_write_in_place_once_full(model, prompt, name):
    """Once a ring / scored cache is full, a decode step writes into the evicted slot: the key and value storages
    stay the same tensors (no torch.cat per token), and the cache keeps budget + 1 slots."""
    cache = build_policy(name, budget=10, **EVICTING[name]).make_cache(model)
    with torch.no_grad():
        model(prompt, past_key_values=cache)
        ptrs = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
        token = prompt[:, -1:]
        for _ in range(15):
            token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == ptrs
    assert cache.stored_lengths() == [10, 10] and cache.get_seq_length() == prompt.shape[1] + 15


@pytest.mark.parametrize("name", ["h2o", "keyformer"])
def test_batched_decode_eviction(model, name, monkeypatch):
    """Decode steps score and evict every layer at once (`LayerStack`). H2O: the tokens kept and the logits equal the
    per-layer eviction's exactly. Keyformer draws its noise for all layers from one stream, so its choice differs
    from the per-layer one; it stays deterministic and within the budget."""
    from memfit.kv.prefill import chunked_prefill

    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(3))

    def run(stackable):
        monkeypatch.setattr(AccumulatedScoreLayer, "stackable", stackable)
        cache = build_policy(name, budget=12).make_cache(model)
        steps = []
        with torch.no_grad():
            logits = chunked_prefill(model, ids, cache, 8)
            for _ in range(10):
                logits = model(logits.argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1]
                steps.append((logits, [layer.kept() for layer in cache.layers]))
                assert all(layer.stored == 12 for layer in cache.layers)
        return cache, steps

    stacked, a = run(True)
    alone, b = run(False)
    assert stacked.shared is not None and alone.shared is None
    if name == "keyformer":
        b = run(True)[1]
    for (la, ka), (lb, kb) in zip(a, b):
        assert torch.equal(la, lb)
        assert all(torch.equal(x, y) for x, y in zip(ka, kb))
