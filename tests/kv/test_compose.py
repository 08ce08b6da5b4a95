"""Eviction composed with KIVI quantization (`h2o` / `keyformer` with `quant`, `memfit.kv.quantized_slots`)."""

import pytest
import torch

from memfit.errors import ConfigError
from memfit.kv import build_policy
from memfit.kv.budget import fullest_bytes, tokens_for_bytes
from memfit.kv.prefill import chunked_prefill
from memfit.memory.spec import RunSpec


def _decode(model, cache, ids, steps):
    """Prefill `ids` in chunks of 7, then greedy-decode `steps` tokens one at a time; each step's logits (a list: a
    generator suspended inside `no_grad` would leave gradients off for whatever runs next)."""
    out = []
    with torch.no_grad():
        logits = chunked_prefill(model, ids, cache, 7)
        for _ in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            logits = model(tok, past_key_values=cache).logits[:, -1]
            out.append(logits)
    return out


def test_budget_holds_and_decode_writes_in_place(model):
    """The cache keeps exactly the budget (+ the stale slot), and decode steps leave every storage in place."""
    policy = build_policy("h2o", budget=12, quant="kivi4", quant_residual=4)
    cache = policy.make_cache(model)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    ptrs = None
    for _ in _decode(model, cache, ids, 6):
        for layer in cache.layers:
            assert layer.stored == 12 and layer.slots() == 13 and layer.quantized == 13 - 4
        storages = [t.data_ptr() for layer in cache.layers for t in (layer.keys, layer.scores, *layer.packed)]
        assert ptrs is None or storages == ptrs
        ptrs = storages


def test_quantized_h2o_tracks_h2o_and_holds_fewer_bytes(model):
    """8-bit storage: every decode step's logits within 2 % of unquantized H2O's at the same budget; 4-bit holds
    fewer bytes than H2O, and the cache bytes equal the estimate throughout."""
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    plain = build_policy("h2o", budget=16)
    q8 = build_policy("h2o", budget=16, quant="kivi8", quant_residual=4)
    c_plain, c_q8 = plain.make_cache(model), q8.make_cache(model)
    for a, b in zip(_decode(model, c_plain, ids, 8), _decode(model, c_q8, ids, 8)):
        assert (a - b).abs().max() <= 0.02 * a.abs().max()
    run = RunSpec.from_model(model, batch=1)
    seen = c_q8.get_seq_length()
    assert c_q8.nbytes() == q8.kv_bytes(run, tokens=seen)
    q4 = build_policy("h2o", budget=16, quant="kivi4", quant_residual=4)
    assert q4.kv_bytes(run, tokens=seen) < plain.kv_bytes(run, tokens=seen) == c_plain.nbytes()


def test_quantized_storage_dequantizes_within_half_a_step(model):
    """The quantized slots reproduce what the layer was given: feed known keys straight into a layer."""
    policy = build_policy("h2o", budget=10, quant="kivi4", quant_residual=3)
    policy._head_dim = 16
    layer = policy.make_layer(0, 1)
    torch.manual_seed(0)
    given = {}
    for t in range(25):
        n = 8 if t == 0 else 1
        if 0 < t < 8:
            continue
        k = torch.randn(1, 2, n, 16) * torch.linspace(0.1, 4, 16)
        v = torch.randn(1, 2, n, 16)
        for i in range(n):
            given[layer.seen + i] = (k[:, :, i], v[:, :, i])
        keys, _ = layer.update(k, v)
        layer.observe_attention(torch.softmax(torch.randn(1, 2, 1, n, keys.shape[2]), dim=-1))
        assert layer.stored <= 10
    q = layer.quantized
    kq, ks, km, vq, vs, vm = layer.packed
    deq_k, deq_v = layer._dequantize(kq, ks, km), layer._dequantize(vq, vs, vm)
    for h in range(2):
        stale = None if layer.stale is None else int(layer._stale_slots()[0, h])
        for s in range(q):
            if s == stale:
                continue
            ref_k, ref_v = given[int(layer.pos[0, h, s])]
            assert torch.all((deq_k[0, h, s] - ref_k[0, h]).abs() <= ks[0, h, s].repeat_interleave(16) / 2 + 1e-5)
            assert torch.all((deq_v[0, h, s] - ref_v[0, h]).abs() <= vs[0, h, s].repeat_interleave(16) / 2 + 1e-5)
        for j in range(layer.keys.shape[2]):  # the full-precision residual is exact
            assert torch.equal(layer.keys[0, h, j], given[int(layer.pos[0, h, q + j])][0][0, h])


def test_byte_budget_counts_quantized_bytes(model):
    run = RunSpec.from_model(model, batch=1)
    plain = tokens_for_bytes(lambda b: build_policy("h2o", budget=b), run, 16 * 1024, "h2o")
    quant = tokens_for_bytes(lambda b: build_policy("h2o", budget=b, quant="kivi2"), run, 16 * 1024, "h2o")
    assert quant > 1.5 * plain
    policy = build_policy("h2o", budget=quant, quant="kivi2")
    assert fullest_bytes(policy, run, quant) <= 16 * 1024 < fullest_bytes(
        build_policy("h2o", budget=quant + 1, quant="kivi2"), run, quant + 1)


def test_quant_needs_a_recent_window():
    with pytest.raises(ConfigError, match="recent_ratio"):
        build_policy("h2o", budget=16, quant="kivi4", recent_ratio=0)
