"""BitStack: each block refines the weight (error and bound fall with every block), exact bytes, and the size
chosen at load time (reading k blocks equals truncating to k, and holds k blocks' bytes)."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.spec import RunSpec
from memfit.models.presets import llama_config
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.weights import load_quantized, save_quantized, weight_bytes
from memfit.weights.bitstack import BitStackFormat, pack_signs, truncate, unpack_signs
from memfit.weights.linear import QuantLinear


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config("llama-tiny", 256)).eval()


def test_sign_packing_round_trips():
    neg = torch.rand(3, 5, 21) < 0.5
    assert torch.equal(unpack_signs(pack_signs(neg), 21), 1.0 - 2.0 * neg.float())


def test_each_block_refines_the_weight():
    torch.manual_seed(0)
    lin = nn.Linear(96, 64, bias=False)
    fmt = BitStackFormat(blocks=6, rank=4)
    q = QuantLinear.from_linear(lin, fmt)
    errors = []
    for k in range(1, 7):
        t = {n: v[:k] for n, v in q.tensors().items()}
        err = (fmt.decode(t, 64, 96) - lin.weight).abs()
        assert (err <= fmt.error_bound(t, 64, 96)).all()
        errors.append(err.pow(2).mean().item())
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.2 * errors[0]


def test_bytes_equal_estimate_and_load_time_size(tmp_path):
    model = llama()
    spec = RunSpec.from_model(model, batch=1, seq=16)
    tech = build_technique("weights", {"name": "bitstack", "blocks": 4, "rank": 4})
    ctx = Context(model=model, spec=spec)
    tech.check(ctx)
    tech.apply(ctx)
    assert weight_bytes(model) == estimate_run(spec, [tech]).parameters + spec.model.buffers_bytes
    save_quantized(model, tmp_path)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = load_quantized(tmp_path)(input_ids=ids).logits
        assert torch.equal(full, model(input_ids=ids).logits)
    sizes = []
    for k in (1, 2, 4):
        small = load_quantized(tmp_path, stack=k)
        cut = truncate(load_quantized(tmp_path), k)
        with torch.no_grad():
            assert torch.equal(small(input_ids=ids).logits, cut(input_ids=ids).logits)
        assert weight_bytes(small) == weight_bytes(cut)
        assert small.model.layers[0].mlp.up_proj.u.shape[0] == k
        sizes.append(weight_bytes(small))
    assert sizes[0] < sizes[1] < sizes[2] == weight_bytes(model)


def test_errors(tmp_path):
    with pytest.raises(ConfigError):
        build_technique("weights", {"name": "bitstack", "blocks": 0})
    with pytest.raises(ConfigError, match="no BitStack"):
        truncate(llama(), 2)
    model = llama()
    build_technique("weights", {"name": "int8"}).apply(Context(model=model, spec=None))
    save_quantized(model, tmp_path)
    with pytest.raises(ConfigError, match="stack"):
        load_quantized(tmp_path, stack=2)
