"""Quantized embedding tables and output layer: row decoding, exact bytes (tied and untied), quality, save/load."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import measure
from memfit.memory.spec import RunSpec
from memfit.models.presets import llama_config
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.weights import apply_weights, load_quantized, save_quantized, weight_bytes
from memfit.weights.embedding import QuantEmbedding, quantize_embeddings
from memfit.weights.format import get_format
from memfit.weights.linear import QuantLinear
from memfit.weights.quant import FORMATS, storage_bytes


def llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = llama_config("llama-tiny", 256)
    config.tie_word_embeddings = tied
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_size", [None, 32])
def test_decode_rows_equals_rows_of_the_decoded_table(fmt, group_size):
    torch.manual_seed(0)
    # 300 rows × 5 groups: NF4's 256-constant blocks straddle rows
    q = QuantLinear.from_linear(nn.Linear(160, 300, bias=False), fmt, group_size)
    rows = torch.tensor([0, 299, 51, 51, 128, 7])
    full = q.format.decode(q.tensors(), 300, 160)
    assert torch.equal(q.format.decode_rows(q.tensors(), rows, 300, 160), full[rows])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_measured_weight_bytes_equal_estimate_with_embeddings(tied, fmt):
    model = llama(tied)
    dense = weight_bytes(model)
    spec = RunSpec.from_model(model, batch=1, seq=16)
    tech = build_technique("weights", {"name": fmt, "embeddings": True})
    ctx = Context(model=model, spec=spec)
    tech.check(ctx)
    tech.apply(ctx)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert (model.lm_head.qweight is model.model.embed_tokens.qweight) == tied  # a tie costs nothing
    est = estimate_run(spec, [tech])
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        _, report = measure(lambda: model(input_ids=ids), model)
    assert report.peak.parameters == est.parameters
    assert weight_bytes(model) == est.parameters + spec.model.buffers_bytes
    # against linears-only quantization: each table (one when tied) goes from fp32 to the format's bytes
    linears_only = llama(tied)
    apply_weights(linears_only, fmt)
    tables = 1 if tied else 2
    saved = tables * (256 * 64 * 4 - storage_bytes(fmt, 256, 64, None))
    assert weight_bytes(model) == weight_bytes(linears_only) - saved < dense


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_quality_close_to_dense(fmt):
    """Next-token loss on the model's own greedy continuation (so the dense loss is low and meaningful)."""
    model = llama(False)
    with torch.no_grad():
        ids = model.generate(torch.randint(0, 256, (4, 4)), max_new_tokens=28, do_sample=False, pad_token_id=0)
        dense = model(input_ids=ids, labels=ids).loss.item()
        apply_weights(model, fmt, embeddings=True)
        quant = model(input_ids=ids, labels=ids).loss.item()
    assert abs(quant - dense) < (0.01 if fmt == "int8" else 0.1) * dense


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_keeps_tie_and_outputs(tied, tmp_path):
    model = llama(tied)
    apply_weights(model, "int4", group_size=32, embeddings=True)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding)
    assert (loaded.lm_head.qweight is loaded.model.embed_tokens.qweight) == tied
    assert weight_bytes(loaded) == weight_bytes(model)


def test_embedding_errors():
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1

    holder = nn.Module()
    holder.emb = Shifted(10, 8)
    with pytest.raises(ConfigError, match="Shifted"):
        quantize_embeddings(holder, "int8")
    with pytest.raises(ConfigError, match="no nn.Embedding"):
        quantize_embeddings(nn.Sequential(nn.ReLU()), "int8")
    with pytest.raises(ConfigError):
        build_technique("weights", {"name": "int8", "embeddings": "sometimes"})


def test_scaled_embedding_keeps_its_scale():
    emb = nn.Embedding(20, 16)
    emb.embed_scale = 4.0
    q = QuantEmbedding.from_embedding(emb, get_format("int8"))
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(q(ids), emb(ids) * 4.0, atol=4.0 * emb.weight.abs().max().item() / 127)


def test_generate_quantize_embeddings_is_wired():
    from memfit.generate import generate

    ids = torch.randint(0, 256, (1, 8))
    linears = generate(llama(False), ids, 3, weights="int8")
    everything = generate(llama(False), ids, 3, weights="int8", quantize_embeddings=True)
    saved = 2 * (256 * 64 * 4 - storage_bytes("int8", 256, 64, None))
    assert everything.memory.parameters == linears.memory.parameters - saved
    assert everything.options["quantize_embeddings"] is True
    with pytest.raises(ConfigError, match="--weights"):
        generate(llama(False), ids, 3, quantize_embeddings=True)
