"""AWQ: activation-aware scales searched on calibration activations beat plain int4 where channels are salient."""

import copy

import pytest
import torch

from memfit.errors import ConfigError, DataError
from memfit.memory.estimate import estimate_run
from memfit.memory.spec import RunSpec
from memfit.models import build_llama
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.weights import apply_weights, load_quantized, save_quantized, weight_bytes
from memfit.weights.awq import calibration_batches, search_scale
from memfit.weights.quant import QuantLinear


def _salient_llama(seed=0):
    """A tiny Llama whose norms amplify a few channels ×12 while the next linears shrink them ÷12.

    The dense function is unchanged, but those weight columns become tiny next to their group's absmax — the
    activation outliers AWQ is about (LLMs grow them in training; here we plant them)."""
    model = build_llama("llama-tiny", 256, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, consumers in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                    (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                ch = torch.randperm(64, generator=gen)[:3]
                norm.weight[ch] *= 12.0
                for c in consumers:
                    mod = layer.self_attn if c.endswith(("q_proj", "k_proj", "v_proj")) else layer.mlp
                    getattr(mod, c).weight[:, ch] /= 12.0
    return model


def test_search_never_worse_than_plain_on_calibration():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    x = torch.randn(256, 128) * torch.logspace(-1, 1, 128)  # channels of very different magnitude
    s, err, plain = search_scale(w, x.abs().mean(0), x, "int4", 64)
    assert err <= plain
    assert err < 0.8 * plain
    assert s.shape == (128,) and (s > 0).all()


def test_awq_beats_plain_int4_on_salient_channels(tmp_path):
    dense = _salient_llama()
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
    plain = apply_weights(copy.deepcopy(dense), "int4", group_size=0)
    awq = apply_weights(copy.deepcopy(dense), "awq", group_size=0, calibration=calib)
    with torch.no_grad():
        ref = dense(input_ids=held_out).logits
        err_plain = (plain(input_ids=held_out).logits - ref).pow(2).mean()
        err_awq = (awq(input_ids=held_out).logits - ref).pow(2).mean()
        logp = ref.log_softmax(-1)
        kl = {n: (logp.exp() * (logp - m(input_ids=held_out).logits.log_softmax(-1))).sum(-1).mean().item()
              for n, m in (("plain", plain), ("awq", awq))}
    assert err_awq < 0.7 * err_plain
    assert kl["awq"] < 0.7 * kl["plain"]  # closer next-token distributions, not just closer logits
    assert all(v["awq_mse"] <= v["plain_mse"] for v in awq.awq_report.values())
    save_quantized(awq, tmp_path)
    loaded = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=held_out).logits, awq(input_ids=held_out).logits)


def test_awq_technique_bytes_equal_estimate():
    model = build_llama("llama-tiny", 256)
    spec = RunSpec.from_model(model, batch=1, seq=32)
    tech = build_technique("weights", {"name": "awq", "group_size": 32, "n_grid": 4})
    data = [{"input_ids": torch.randint(0, 256, (32,))} for _ in range(4)]
    ctx = Context(model=model, spec=spec, data=data)
    tech.check(ctx)
    tech.apply(ctx)
    assert all(m.in_scale is not None for m in model.modules() if isinstance(m, QuantLinear))
    est = estimate_run(spec, [tech])
    assert weight_bytes(model) == est.parameters + spec.model.buffers_bytes


def test_awq_errors():
    model = build_llama("llama-tiny", 256)
    tech = build_technique("weights", {"name": "awq"})
    with pytest.raises(ConfigError, match="calibration"):
        tech.check(Context(model=model, spec=RunSpec.from_model(model)))
    with pytest.raises(DataError):
        calibration_batches([])
    with pytest.raises(ConfigError):
        build_technique("weights", {"name": "awq", "bits": 8})


def test_calibration_hooks_that_never_fire_are_a_compat_error():
    """AWQ scales each layer from the inputs its forward pre-hook saw; a layer never seen must not pass silently."""
    from memfit.errors import CompatError
    from memfit.weights.awq import collect_activation_stats

    model = build_llama("llama-tiny", 64, seed=0)
    model.unused = torch.nn.Linear(4, 4)  # registered, never called: its pre-hook cannot fire
    ids = torch.randint(0, 64, (1, 8))
    assert collect_activation_stats(model, ["model.layers.0.mlp.up_proj"], [ids])["model.layers.0.mlp.up_proj"].n_rows
    with pytest.raises(CompatError, match=r"no input of 1 linear layers \(e.g. unused\).*torch \d"):
        collect_activation_stats(model, ["model.layers.0.mlp.up_proj", "unused"], [ids])
