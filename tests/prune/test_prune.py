"""Structured pruning (SliceGPT, FLAP, LLM-Pruner): smaller models that plain transformers reloads, exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from memfit.models import build_llama
from memfit.models.presets import llama_config
from memfit.prune import max_logit_difference, prune_model
from memfit.prune.common import MARKER, save_pruned
from memfit.prune.layout import LAYOUTS
from memfit.prune.llm_pruner import accumulate_gradients, group_importance

VOCAB = 256


@pytest.fixture
def base():
    model = build_llama("llama-tiny", VOCAB, seed=0).eval()  # hidden 64, MLP 176, 2 layers, 4 heads, 2 kv heads
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking norms, so folding them into the linears is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, 32), generator=g)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def llama_params(c) -> int:
    """Parameters of a LlamaForCausalLM with config `c`, counted by hand."""
    h, hd, q, kv, inter = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    attn = h * q * hd * 2 + h * kv * hd * 2 + (q * hd + 2 * kv * hd + h) * c.attention_bias
    mlp = 3 * h * inter + (2 * inter + h) * c.mlp_bias
    embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    return embed + c.num_hidden_layers * (attn + mlp + 2 * h) + h


# method, sparsity, the config the pruned model must have
EXPECTED = [
    ("slicegpt", 0.5, {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 176}),
    ("llm-pruner", 0.5, {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "intermediate_size": 88}),
    ("flap", 0.5, {"hidden_size": 64, "mlp_bias": True}),
]


@pytest.mark.parametrize("method,sparsity,shape", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_pruned_folder_reloads_with_plain_transformers(base, tmp_path, method, sparsity, shape):
    before = llama_params(base.config)
    assert sum(p.numel() for p in base.parameters()) == before
    result = prune_model(copy.deepcopy(base), method, sparsity, _ids(8, 0))
    save_pruned(result, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for key, value in shape.items():
        assert getattr(reloaded.config, key) == value, key
    n = sum(p.numel() for p in reloaded.parameters())
    assert n == result.params_after == llama_params(reloaded.config) < before
    if method == "flap":  # the heads/channels FLAP removed, at the parameter target (within one head group)
        d = result.details
        assert d["channels_removed_per_layer"] > 0
        assert abs((before - n) - 0.5 * 2 * (4 * 64 * 16 * 4 + 3 * 64 * 176)) < 4 * 64 * 16 * 2
    held_out = _ids(4, 1)
    torch.testing.assert_close(_logits(reloaded, held_out), _logits(result.model, held_out), rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "out" / MARKER).read_text())["params_after"] == n


@pytest.mark.parametrize("tied", [False, True])
def test_slicegpt_at_zero_is_the_original_model(tied, tmp_path):
    """Computational invariance: norms folded, residual rotated by Q, nothing deleted → the same function."""
    config = llama_config("llama-tiny", VOCAB)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    held_out = _ids(4, 1)
    ref = _logits(model, held_out)
    result = prune_model(copy.deepcopy(model), "slicegpt", 0.0, _ids(8, 0))
    assert result.params_after == result.params_before + (VOCAB * 64 if tied else 0)  # untied head
    rotated = result.model.model.embed_tokens.weight
    assert not torch.allclose(rotated, model.model.embed_tokens.weight, atol=1e-3)  # the rotation took effect
    torch.testing.assert_close(_logits(result.model, held_out), ref, rtol=0, atol=2e-5)
    save_pruned(result, None, tmp_path / "out")
    assert max_logit_difference(result.model, tmp_path / "out", held_out) < 1e-5
    # slicing changes the function, by less when fewer directions go
    errs = [(_logits(prune_model(copy.deepcopy(model), "slicegpt", s, _ids(8, 0)).model, held_out) - ref)
            .pow(2).mean() for s in (0.1, 0.5)]
    assert 0 < errs[0] < errs[1]


def test_flap_bias_compensation_reduces_output_error(base):
    """A removed channel replaced by its calibration mean beats a removed channel replaced by zero. Random weights
    give channels of mean ~0 (nothing to compensate), so the MLP here has trained-like non-zero means: up_proj =
    gate_proj makes each channel silu(g)·g, mostly positive."""
    with torch.no_grad():
        for layer in base.model.layers:
            layer.mlp.up_proj.weight.copy_(layer.mlp.gate_proj.weight)
    calib, held_out = _ids(16, 0), _ids(8, 1)
    ref = _logits(base, held_out)
    errors = {}
    for bias in (True, False):
        result = prune_model(copy.deepcopy(base), "flap", 0.3, calib, bias=bias)
        assert result.model.config.mlp_bias is bias
        errors[bias] = (_logits(result.model, held_out) - ref).pow(2).mean().item()
    assert errors[True] < 0.75 * errors[False], errors  # measured: 0.49×


def test_llm_pruner_importance_is_the_taylor_score(base):
    """Σ|w·∂L/∂w| per dependency group, against gradients taken here with autograd on the summed window loss."""
    ids = _ids(6, 0)
    model = copy.deepcopy(base)
    layer = model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
               mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")
    grads = torch.autograd.grad(loss / (ids.shape[1] - 1), weights)
    s = [(w * g).abs().double() for w, g in zip(weights, grads)]
    hd, rep = 16, 2  # 4 query heads share 2 kv heads
    heads = torch.stack([s[0][k * rep * hd:(k + 1) * rep * hd].sum() + s[1][k * hd:(k + 1) * hd].sum()
                         + s[2][k * hd:(k + 1) * hd].sum() + s[3][:, k * rep * hd:(k + 1) * rep * hd].sum()
                         for k in range(2)])
    channels = s[4].sum(1) + s[5].sum(1) + s[6].sum(0)

    for p in model.parameters():
        p.grad = None
    accumulate_gradients(model, ids, batch_size=4)  # two batches: gradients must add up
    got_heads, got_channels = group_importance(layer, LAYOUTS["llama"])
    torch.testing.assert_close(got_heads, heads, rtol=1e-4, atol=0)
    torch.testing.assert_close(got_channels, channels, rtol=1e-4, atol=1e-12)
    assert model.model.embed_tokens.weight.grad is None  # only the layers' linears take gradients

    pruned = prune_model(copy.deepcopy(base), "llm-pruner", 0.5, ids).model
    keep = torch.sort(torch.argsort(channels, descending=True)[:88]).values
    torch.testing.assert_close(pruned.model.layers[1].mlp.gate_proj.weight, mlp.gate_proj.weight[keep])
    kept_group = int(torch.argmax(heads))
    torch.testing.assert_close(pruned.model.layers[1].self_attn.k_proj.weight,
                               attn.k_proj.weight[kept_group * hd:(kept_group + 1) * hd])


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
def test_refuses_other_architectures_and_bad_sparsity(base, arch):
    """One error naming the architecture and the supported ones (GPT-2: Conv1D; Phi-1/2: parallel attention+MLP)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from memfit.errors import ConfigError, ModelError

    config = AutoConfig.for_model(arch, hidden_size=32, n_embd=32, num_hidden_layers=1, n_layer=1,
                                  num_attention_heads=2, n_head=2, vocab_size=64, bos_token_id=None,
                                  eos_token_id=None)
    other = AutoModelForCausalLM.from_config(config)
    for method in ("slicegpt", "flap", "llm-pruner"):
        with pytest.raises(ModelError, match=rf"architecture '{arch}'; supported: llama, mistral, qwen2, qwen3, "
                                             rf"gemma, phi3, opt, gpt_neox$"):
            prune_model(other, method, 0.2, _ids(2, 0) % 64)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        prune_model(base, "slicegpt", 1.0, _ids(2, 0))
    with pytest.raises(ConfigError, match="unknown pruning method"):
        prune_model(base, "wanda", 0.2, _ids(2, 0))


def test_head_counts_are_ones_llama_config_accepts():
    """transformers' LlamaConfig refuses a hidden size that is not a multiple of the heads: 128 with 3 heads."""
    from transformers import LlamaConfig

    from memfit.prune.common import allocate, allowed_group_removals, group_params

    with pytest.raises(Exception, match="multiple of the number of attention heads"):
        LlamaConfig(hidden_size=128, num_attention_heads=3, num_key_value_heads=3, head_dim=32)
    llama = LAYOUTS["llama"]
    assert allowed_group_removals(128, 4, 1, llama) == [0, 2, 3]
    assert allowed_group_removals(96, 4, 1, llama) == [0, 1, 2, 3]
    assert allowed_group_removals(64, 2, 2, llama) == [0, 1]  # 4 query heads in 2 groups
    assert allowed_group_removals(128, 4, 1, LAYOUTS["mistral"]) == [0, 1, 2, 3]  # head_dim read from the config
    assert allowed_group_removals(128, 4, 1, LAYOUTS["opt"]) == [0]  # head_dim = hidden / heads: no head goes
    # 1 of 4 heads wanted, not allowed at hidden 128: none go, and MLP channels carry the whole target
    groups, channels = allocate(target=2 * 3 * 128 * 50, wanted_groups=1, allowed=[0, 2, 3], n_layers=2,
                                head_params=group_params(128, 1, 32), channel_params=3 * 128, n_channels=352)
    assert (groups, channels) == (0, 50)


def test_flap_adaptive_widths_run_in_memory_but_are_not_saved(base, tmp_path):
    """The paper's per-layer widths: a working model, which no single LlamaConfig describes, so saving refuses."""
    from memfit.errors import ModelError

    held_out = _ids(4, 1)
    result = prune_model(copy.deepcopy(base), "flap", 0.5, _ids(16, 0), uniform=False)
    widths = [layer.mlp.gate_proj.out_features for layer in result.model.model.layers]
    assert len(set(widths)) > 1 and result.details["channels_removed_per_layer"] == [176 - w for w in widths]
    assert result.params_after < 0.75 * result.params_before
    assert torch.isfinite(_logits(result.model, held_out)).all()
    with pytest.raises(ModelError, match="differ in shape"):
        save_pruned(result, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
