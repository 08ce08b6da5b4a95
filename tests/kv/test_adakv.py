"""Ada-KV: a layer budget shared by its heads by top-k over all heads' scores (`memfit.kv.adakv`)."""

import pytest
import torch

from memfit.kv import build_policy
from memfit.kv.adakv import AdaKVLayer
from memfit.kv.prefill import chunked_prefill
from memfit.memory.spec import RunSpec


def _run(model, policy, ids, chunk, steps):
    cache = policy.make_cache(model)
    out = []
    with torch.no_grad():
        logits = chunked_prefill(model, ids, cache, chunk)
        out.append(logits)
        for _ in range(steps):
            logits = model(logits.argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1]
            out.append(logits)
    return cache, torch.stack(out)


@pytest.mark.parametrize("scoring", ["h2o", "snapkv"])
def test_equals_full_attention_when_the_budget_covers_the_text(model, scoring):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    _, full = _run(model, build_policy("full"), ids, 7, 5)
    _, ada = _run(model, build_policy("adakv", budget=32, scoring=scoring), ids, 7, 5)
    torch.testing.assert_close(ada, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"scoring": "snapkv", "window": 4, "kernel": 3}])
def test_budget_holds_and_bytes_equal_estimate(model, options):
    """The pool holds budget · kv_heads tokens per layer and batch row, each head at least its recent window;
    measured bytes == estimate (H2O scoring: below uniform H2O's at the same budget)."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    policy = build_policy("adakv", budget=10, **options)
    run = RunSpec.from_model(model, batch=2)
    cache, logits = _run(model, policy, ids, 6, 8)
    assert torch.isfinite(logits).all()
    lengths = torch.stack([layer.head_lengths() for layer in cache.layers])  # (layers, B, H)
    assert torch.all(lengths.sum(-1) == 10 * 2)
    assert torch.all(lengths >= policy.recent())
    assert cache.nbytes() == policy.kv_bytes(run, tokens=cache.get_seq_length())
    if not options:
        assert cache.nbytes() < build_policy("h2o", budget=10).kv_bytes(run, tokens=cache.get_seq_length())


@pytest.mark.parametrize("window", [None, 2])
def test_concentrated_head_gives_its_budget_to_a_dispersed_one(window):
    """Head 0 puts all attention on the first token, head 1 spreads it evenly: top-k over both heads' scores keeps
    head 0's first token and recent window only, and hands the rest of the layer's 2 × 8 slots to head 1 (H2O
    scores, and SnapKV's window scores)."""
    layer = AdaKVLayer(budget=8, recent=2, heads=2, window=window)
    for step in range(30):
        q = 10 if step == 0 else 1
        layer.attention_bias(q, torch.float32, 1)
        keys, _ = layer.update(torch.randn(1, 2, q, 16), torch.randn(1, 2, q, 16))
        n = keys.shape[2]
        index, valid = layer._view if layer._view is not None else (None, None)
        probs = torch.zeros(1, 2, 1, q, n)
        probs[0, 0, 0, :, 0] = 1.0  # head 0's first entry: its oldest kept token (the view is in position order)
        visible = torch.ones(n) if valid is None or valid.numel() == 0 else torch.cat([valid[0, 1].float(),
                                                                                       torch.ones(q)])
        probs[0, 1, 0] = visible / visible.sum()
        layer.observe_attention(probs)
    lengths = layer.head_lengths()[0].tolist()
    assert sum(lengths) == 16 and lengths[0] <= 3 < 13 <= lengths[1]
    assert 0 in layer.pool["pos"][0][layer.pool["head"][0] == 0].tolist()


def test_padding_gets_no_attention(model):
    """After unequal allocation, the probabilities each head pays its padded entries are exactly 0 and every row
    still sums to 1."""
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    cache, _ = _run(model, build_policy("adakv", budget=6, recent_ratio=0.2), ids, 5, 2)
    head = cache.layers[0].pool["head"]
    head[0, (head[0] == 0).nonzero()[:3, 0]] = 1  # hand three of head 0's slots to head 1: lengths 3 and 9
    cache.layers[0].evict()
    assert cache.layers[0].head_lengths()[0].tolist() == [3, 9]
    layer = cache.layers[0]
    seen = []
    original = layer.observe_attention
    layer.observe_attention = lambda probs: (seen.append((probs.clone(), layer._view)), original(probs))[-1]
    with torch.no_grad():
        model(torch.tensor([[3]]), past_key_values=cache)
    probs, (_, valid) = seen[0]
    assert not valid.all()
    past = probs[..., :valid.shape[-1]]  # (B, H, group, q, longest)
    assert torch.all(past.masked_select(~valid[:, :, None, None, :].expand_as(past)) == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
