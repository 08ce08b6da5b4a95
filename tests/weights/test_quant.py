"""Group-wise int8 / int4 / int3 / NF4: error bounds, exact bytes, parity with bitsandbytes, save/load, errors."""

import math

import pytest
import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import measure
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.weights import apply_weights, load_quantized, save_quantized, weight_bytes
from memfit.weights.bitstack import BitStackFormat
from memfit.weights.int4 import Int4Weights
from memfit.weights.int8 import Int8Weights
from memfit.weights.nf4 import NF4Weights
from memfit.weights.quant import (
    FORMATS,
    NF4_CODE,
    QuantLinear,
    error_bound,
    pack_nibbles,
    quantize_model,
    quantize_tensor,
    storage_bytes,
    unpack_nibbles,
)

TECHS = {"int8": Int8Weights, "int4": Int4Weights, "nf4": NF4Weights}


def test_nibble_packing_round_trips():
    codes = torch.randint(0, 16, (7, 40), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (7, 20) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_size", [None, 32, 0])
def test_dequantize_error_within_format_bound(fmt, group_size):
    torch.manual_seed(1)
    lin = nn.Linear(176, 48)  # 176 is not a multiple of 32/64: rows are padded
    with torch.no_grad():
        lin.weight[0, :5] = torch.tensor([8.0, -6.0, 0.0, 1e-4, -1e-4])  # outliers and tiny values
        lin.weight[1] = 0.0  # an all-zero row must stay exact
    q = QuantLinear.from_linear(lin, fmt, group_size)
    err = (q.dequantize() - lin.weight).abs()
    bound = error_bound(fmt, q.tensors(), (48, 176))
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"
    if not isinstance(q.format, BitStackFormat):  # low-rank factors leak a little into an all-zero row
        assert torch.equal(q.dequantize()[1], torch.zeros(176))
    # the bound is not vacuous: some element comes close to it
    assert (err / bound).max() > 0.3


def test_more_bits_less_error():
    torch.manual_seed(2)
    w = torch.randn(64, 256)
    errs = {}
    for fmt in FORMATS:
        lin = nn.Linear(256, 64, bias=False)
        lin.weight.data = w.clone()
        errs[fmt] = (QuantLinear.from_linear(lin, fmt, 64).dequantize() - w).pow(2).mean().item()
    # 4-bit NF4 (absmax, no zero point) and asymmetric int4 (scale + zero) land within a few % of each other
    assert errs["int8"] * 50 < min(errs["nf4"], errs["int4"]) and max(errs["nf4"], errs["int4"]) * 3 < errs["int3"]


def test_nf4_codes_match_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(3)
    w = torch.randn(64, 256)
    assert torch.allclose(bnbf.get_4bit_type("nf4", device="cpu"), NF4_CODE)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    b = packed.flatten()
    bnb_codes = torch.stack((b >> 4, b & 0xF), -1).flatten()  # bitsandbytes: high nibble first
    ours = quantize_tensor(w, "nf4", 64)
    assert torch.equal(unpack_nibbles(ours["qweight"]).flatten(), bnb_codes)
    ref = bnbf.dequantize_4bit(packed, state)
    q = QuantLinear(256, 64, "nf4", 64)
    q.load_tensors(ours)
    # only the double quantization of absmax differs (bnb stored them in fp32 here)
    assert (q.dequantize() - ref).abs().max() < 0.01 * w.abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_and_input_gradient_match_dequantized_linear(fmt):
    torch.manual_seed(4)
    lin = nn.Linear(64, 40)
    q = QuantLinear.from_linear(lin, fmt)
    x = torch.randn(2, 3, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = q(x)
    ref = nn.functional.linear(x2, q.dequantize(), lin.bias)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    assert all(p.grad is None for p in q.parameters())


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_measured_weight_bytes_equal_estimate(tiny_llama, fmt):
    spec = RunSpec.from_model(tiny_llama, batch=2, seq=16)
    tech = TECHS[fmt]()
    ctx = Context(model=tiny_llama, spec=spec)
    tech.check(ctx)
    tech.apply(ctx)
    est = estimate_run(spec, [tech])
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        _, report = measure(lambda: tiny_llama(input_ids=ids), tiny_llama)
    assert report.peak.parameters == est.parameters
    assert weight_bytes(tiny_llama) == est.parameters + spec.model.buffers_bytes
    # per-layer formula of record
    for m in tiny_llama.modules():
        if isinstance(m, QuantLinear):
            assert m.quantized_bytes() == storage_bytes(fmt, m.out_features, m.in_features, m.group_size)


def test_nf4_bytes_per_parameter_is_about_0_52():
    lin = nn.Linear(1024, 512, bias=False)
    q = QuantLinear.from_linear(lin, "nf4")
    per_param = q.quantized_bytes() / lin.weight.numel()
    assert per_param == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-5)
    assert 0.51 < per_param < 0.52
    assert math.isclose(QuantLinear.from_linear(lin, "int4").quantized_bytes() / lin.weight.numel(), 0.5 + 3 / 64)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_save_load_round_trip(tiny_llama, fmt, tmp_path):
    apply_weights(tiny_llama, fmt, group_size=32 if fmt != "int8" else None)
    save_quantized(tiny_llama, tmp_path)
    loaded = load_quantized(tmp_path)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(tiny_llama(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert weight_bytes(loaded) == weight_bytes(tiny_llama)
    assert (tmp_path / "model.safetensors").stat().st_size < 1.1 * weight_bytes(tiny_llama)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    assert not isinstance(loaded.lm_head, QuantLinear)  # skipped by default


def test_quantized_model_generates_close_to_dense(tiny_llama):
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        dense = tiny_llama(input_ids=ids).logits
        apply_weights(tiny_llama, "int8")
        q = tiny_llama(input_ids=ids).logits
    assert (q - dense).abs().max() < 0.05 * dense.abs().max()


def test_errors(tiny_llama):
    with pytest.raises(ConfigError, match="nn.Linear"):
        quantize_model(tiny_llama, "nf4", target=("input_layernorm",))
    with pytest.raises(ConfigError, match="nn.Linear"):
        quantize_model(tiny_llama, "int4", target=("embed_tokens",))
    with pytest.raises(ConfigError, match="unknown weight format"):
        apply_weights(tiny_llama, "int2")
    with pytest.raises(ConfigError, match="no nn.Linear"):
        quantize_model(tiny_llama, "int8", target=("does_not_exist",))
    with pytest.raises(ConfigError, match="even"):
        QuantLinear(64, 8, "int4", group_size=33)
    with pytest.raises(ConfigError, match="calibration"):
        apply_weights(tiny_llama, "awq")
    from memfit.techniques.registry import build_technique

    with pytest.raises(ConfigError, match="group_size"):
        build_technique("weights", {"name": "nf4", "group_size": -1})
