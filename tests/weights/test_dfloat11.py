"""DFloat11: lossless (outputs bit-identical to the bf16 model), about 70 % of bf16, the estimate close to the
measured size, length-limited Huffman codes, save/load with data-dependent shapes."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from memfit.memory.estimate import estimate_run
from memfit.memory.spec import RunSpec
from memfit.models.presets import llama_config
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.weights import load_quantized, save_quantized, weight_bytes
from memfit.weights.dfloat11 import MAX_CODE, code_lengths
from memfit.weights.embedding import QuantEmbedding
from memfit.weights.linear import QuantLinear


def bf16_llama(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = llama_config("llama-tiny", 256)
    config.tie_word_embeddings = tied
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("embeddings,tied", [(False, False), (True, False), (True, True)])
def test_outputs_bit_identical_to_bf16(embeddings, tied):
    model = bf16_llama(tied)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    dense_bytes = weight_bytes(model)
    spec = RunSpec.from_model(model, batch=2, seq=24)
    tech = build_technique("weights", {"name": "dfloat11", "embeddings": embeddings})
    ctx = Context(model=model, spec=spec)
    tech.check(ctx)
    tech.apply(ctx)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) == embeddings
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    # smaller than bf16 (the norms stay bf16), and the predicted size is close to the stored one
    assert weight_bytes(model) < (0.76 if embeddings else 0.85) * dense_bytes
    est = estimate_run(spec, [tech]).parameters
    assert abs(est - (weight_bytes(model) - spec.model.buffers_bytes)) < 0.06 * est


def test_about_70_percent_of_bf16_on_a_linear_layer():
    torch.manual_seed(0)
    lin = nn.Linear(512, 256, bias=False)
    nn.init.normal_(lin.weight, std=0.02)  # an LLM's initialisation
    q = QuantLinear.from_linear(lin, "dfloat11")
    assert torch.equal(q.dequantize(), lin.weight.bfloat16().float())
    ratio = q.quantized_bytes() / (lin.weight.numel() * 2)
    assert 0.6 < ratio < 0.72


def test_code_lengths_limited_and_prefix_free():
    counts = torch.zeros(256, dtype=torch.long)
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts[:30] = torch.tensor(fib)  # plain Huffman would need 29-bit codes
    lengths = code_lengths(counts)
    assert int(lengths.max()) <= MAX_CODE
    used = lengths[lengths > 0].double()
    assert used.numel() == 30 and (2.0 ** -used).sum() <= 1.0  # Kraft: a prefix code exists
    # a skewed weight decodes exactly with those limited codes
    w = torch.cat([torch.full((int(c),), 2.0 ** (e - 20)) for e, c in enumerate(fib[:22])])
    w = w[torch.randperm(w.numel())][: 64 * 97].view(64, 97)
    q = QuantLinear.from_linear(nn.Linear(97, 64, bias=False).requires_grad_(False), "dfloat11")
    q.load_tensors(q.format.encode(w, 97))
    assert torch.equal(q.dequantize(), w.bfloat16().float())


def test_single_exponent_weight():
    w = torch.full((8, 40), -1.5)
    q = QuantLinear.from_linear(nn.Linear(40, 8, bias=False), "dfloat11")
    q.load_tensors(q.format.encode(w, 40))
    assert torch.equal(q.dequantize(), w)


def test_save_load_round_trip(tmp_path):
    model = bf16_llama(tied=True)
    build_technique("weights", {"name": "dfloat11", "embeddings": True}).apply(Context(model=model, spec=None))
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path).eval()
    # the rotary inv_freq buffer is rebuilt in fp32 on load; the bf16 model's was cast by .to(bfloat16)
    loaded.model.rotary_emb = model.model.rotary_emb
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert weight_bytes(loaded) == weight_bytes(model)
