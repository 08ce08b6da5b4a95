"""Structured pruning beyond Llama: Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms), Gemma ((1 + w) norm
scale, √hidden embedding scale), Phi-3 (fused qkv_proj and gate_up_proj). Tiny models from config; each pruned
folder must reload with plain transformers to the same logits and the parameter count worked out by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from memfit.errors import ConfigError
from memfit.prune import max_logit_difference, prune_model
from memfit.prune.common import save_pruned

VOCAB, HIDDEN, HEADS, KV, HD, INTER, LAYERS = 256, 64, 4, 2, 16, 176, 2
FAMILIES = ["mistral", "qwen2", "qwen3", "gemma", "phi3"]
METHODS = ["slicegpt", "flap", "llm-pruner"]


def build(family: str, seed: int = 0, vocab: int = VOCAB):
    config = AutoConfig.for_model(family, vocab_size=vocab, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                  num_key_value_heads=KV, head_dim=HD, intermediate_size=INTER,
                                  num_hidden_layers=LAYERS, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # trained-looking norms and biases, so that folding and slicing them is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's scale is 1 + w: w around 0, the others' w around 1
                p.uniform_(-0.5, 0.5) if family == "gemma" else p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def hand_count(family: str, c) -> int:
    """Parameters of the family's causal LM with config `c`, counted by hand."""
    h, hd, q, kv, inter = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    attn = 2 * h * q * hd + 2 * h * kv * hd
    if family == "qwen2":  # q, k and v always carry a bias, o_proj never
        attn += q * hd + 2 * kv * hd
    if getattr(c, "attention_bias", False):  # Qwen3, Gemma: the flag switches all four
        attn += q * hd + 2 * kv * hd + h
    norms = 2 * h + (2 * hd if family == "qwen3" else 0)  # Qwen3's q_norm and k_norm: one head_dim each
    embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    return embed + c.num_hidden_layers * (attn + 3 * h * inter + norms) + h


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_pruned_folder_reloads(family, method, tmp_path):
    model = build(family)
    before = hand_count(family, model.config)
    assert sum(p.numel() for p in model.parameters()) == before
    result = prune_model(model, method, 0.5, _ids(8, 0))
    save_pruned(result, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(result.model)
    c = reloaded.config
    if method == "slicegpt":
        assert c.hidden_size == 32 and c.intermediate_size == INTER
    else:
        assert c.hidden_size == HIDDEN and c.intermediate_size < INTER
    if method == "llm-pruner":
        assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)  # one of two head groups
    n = sum(p.numel() for p in reloaded.parameters())
    assert n == result.params_after == hand_count(family, c) < 0.75 * before
    torch.testing.assert_close(_logits(reloaded, _ids(3, 1)), _logits(result.model, _ids(3, 1)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_slicegpt_at_zero_is_the_original_model(family, tmp_path):
    """Norms (Gemma: 1 + w) folded, embedding scale kept, residual rotated, nothing deleted → the same function."""
    model = build(family)
    held_out = _ids(3, 1)
    ref = _logits(model, held_out)
    result = prune_model(copy.deepcopy(model), "slicegpt", 0.0, _ids(8, 0))
    assert not torch.allclose(result.model.model.embed_tokens.weight, model.model.embed_tokens.weight, atol=1e-3)
    torch.testing.assert_close(_logits(result.model, held_out), ref, rtol=0, atol=2e-5)
    save_pruned(result, None, tmp_path / "out")
    assert max_logit_difference(result.model, tmp_path / "out", held_out) < 1e-5


def _phi3_as_llama(phi3) -> LlamaForCausalLM:
    """The same network with its fused qkv_proj and gate_up_proj split into Llama's separate linears."""
    c = phi3.config
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV,
                         head_dim=HD, intermediate_size=INTER, num_hidden_layers=LAYERS, rms_norm_eps=c.rms_norm_eps,
                         tie_word_embeddings=c.tie_word_embeddings, pad_token_id=None, bos_token_id=None,
                         eos_token_id=None)
    llama = LlamaForCausalLM(config).eval()
    state = {}
    for k, v in phi3.state_dict().items():
        if "qkv_proj" in k:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.split([HEADS * HD, KV * HD, KV * HD])):
                state[k.replace("qkv_proj", name)] = part
        elif "gate_up_proj" in k:
            for name, part in zip(("gate_proj", "up_proj"), v.chunk(2)):
                state[k.replace("gate_up_proj", name)] = part
        else:
            state[k] = v
    llama.load_state_dict(state, strict=True)
    return llama


@pytest.mark.parametrize("method", METHODS)
def test_phi3_fused_rows_are_pruned_like_split_linears(method):
    """Phi-3 pruned through its fused linears and the same weights as a Llama pruned through separate ones make the
    same choices: equal parameter counts and equal logits."""
    phi3 = build("phi3")
    llama = _phi3_as_llama(phi3)
    held_out = _ids(3, 1)
    torch.testing.assert_close(_logits(llama, held_out), _logits(phi3, held_out), rtol=0, atol=1e-5)
    options = {"bias": False} if method == "flap" else {}  # a Llama config could hold FLAP's biases, Phi-3's not
    a, b = (prune_model(m, method, 0.5, _ids(8, 0), **options) for m in (phi3, llama))
    assert a.params_after == b.params_after
    assert a.details.pop("variance_kept", 0) == pytest.approx(b.details.pop("variance_kept", 0), rel=1e-8)
    assert a.details == b.details
    torch.testing.assert_close(_logits(a.model, held_out), _logits(b.model, held_out), rtol=0, atol=1e-4)


def test_flap_bias_compensation_only_where_the_config_holds_it():
    """Gemma/Qwen3 can switch on an o_proj bias but have none on down_proj; Mistral has neither."""
    gemma = prune_model(build("gemma"), "flap", 0.6, _ids(8, 0))
    assert gemma.details["bias_compensation"] == ["o_proj"] and gemma.details["head_groups_removed_per_layer"] == 1
    assert gemma.model.config.attention_bias and gemma.model.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
    assert gemma.model.model.layers[0].mlp.down_proj.bias is None
    mistral = prune_model(build("mistral"), "flap", 0.4, _ids(8, 0))
    assert mistral.details["bias_compensation"] == []
    with pytest.raises(ConfigError, match="mistral config can hold one on neither"):
        prune_model(build("mistral"), "flap", 0.4, _ids(8, 0), bias=True)
    with pytest.raises(ConfigError, match="fused qkv_proj"):
        prune_model(build("phi3"), "flap", 0.4, _ids(8, 0), uniform=False)


def build_layernorm(family: str):
    """Tiny OPT / GPT-NeoX (LayerNorm with bias, ungated MLP), biases and norms randomised."""
    config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                  num_hidden_layers=LAYERS, ffn_dim=INTER, intermediate_size=INTER,
                                  max_position_embeddings=64, pad_token_id=None, bos_token_id=None,
                                  eos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def layernorm_hand_count(family: str, c) -> int:
    """Parameters of a tiny OPT / GPT-NeoX with config `c`, counted by hand (every linear has a bias here)."""
    h, inter = c.hidden_size, (c.ffn_dim if family == "opt" else c.intermediate_size)
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    if family == "opt":  # learned positions (2 offset rows), embedding tied to the head
        embed = c.vocab_size * h + (c.max_position_embeddings + 2) * h
    else:  # rotary; untied head
        embed = 2 * c.vocab_size * h
    return embed + c.num_hidden_layers * layer + 2 * h


@pytest.mark.parametrize("method", ["flap", "llm-pruner"])
@pytest.mark.parametrize("family", ["opt", "gpt_neox"])
def test_layernorm_family_prunes_mlp_channels(family, method, tmp_path):
    """OPT / GPT-NeoX: heads cannot go (head_dim = hidden / heads), MLP channels can; FLAP's bias compensation
    lands on their existing fc2 / dense_4h_to_h bias."""
    model = build_layernorm(family)
    before = layernorm_hand_count(family, model.config)
    assert sum(p.numel() for p in model.parameters()) == before
    result = prune_model(model, method, 0.3, _ids(8, 0))
    assert result.details["head_groups_removed_per_layer"] == 0
    if method == "flap":
        assert len(result.details["bias_compensation"]) == 2
    save_pruned(result, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    c = reloaded.config
    assert c.num_attention_heads == HEADS and c.hidden_size == HIDDEN
    width = c.ffn_dim if family == "opt" else c.intermediate_size
    assert width == INTER - result.details["channels_removed_per_layer"] < INTER
    n = sum(p.numel() for p in reloaded.parameters())
    assert n == result.params_after == layernorm_hand_count(family, c) < 0.8 * before
    torch.testing.assert_close(_logits(reloaded, _ids(3, 1)), _logits(result.model, _ids(3, 1)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "gpt_neox"])
def test_slicegpt_refuses_layernorm_models(family):
    from memfit.errors import ModelError

    with pytest.raises(ModelError, match=f"SliceGPT needs RMSNorm, and {family} uses LayerNorm"):
        prune_model(build_layernorm(family), "slicegpt", 0.2, _ids(4, 0))
