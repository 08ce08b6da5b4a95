"""The analytic activation model against what the meter measures after one forward.

The model is derived from the tensors autograd saves, so it should be (near) exact on CPU; the issue asks
for ±15 %, we assert ±2 % (measured ratios are in docs/architecture.md)."""

from __future__ import annotations

import itertools

import pytest

from memfit.memory.estimate import (
    activation_bytes,
    activation_components,
    backward_temporaries,
    baseline,
    layer_components,
    step_peak,
)
from memfit.memory.measure import MemoryMeter

from .conftest import batch_for, forward_backward, spec_for, tiny_bert, tiny_llama

GRID = list(itertools.product(["sdpa", "eager"], ["fp32", "bf16"], [64, 256]))


def _check(model, task, attn, precision, seq, batch=2):
    spec = spec_for(model, task, batch, seq, precision, attn)
    report, after_forward = forward_backward(model, batch_for(model, task, batch, seq), precision, MemoryMeter(model))
    est = baseline(spec)
    assert after_forward / est.activations == pytest.approx(1.0, abs=0.02)
    assert report.category_peaks.temporaries / est.temporaries == pytest.approx(1.0, abs=0.1)
    assert report.tensor_peak / step_peak(spec, est) == pytest.approx(1.0, abs=0.15)
    return spec


@pytest.mark.parametrize("attn,precision,seq", GRID)
def test_llama_activations(attn, precision, seq):
    _check(tiny_llama(attn), "causal_lm", attn, precision, seq)


@pytest.mark.parametrize("attn,precision,seq", GRID)
def test_bert_seq_cls_activations(attn, precision, seq):
    _check(tiny_bert("seq_cls", attn), "seq_cls", attn, precision, seq)


@pytest.mark.parametrize("attn,seq", [("sdpa", 64), ("eager", 256)])
def test_bert_token_cls_activations(attn, seq):
    _check(tiny_bert("token_cls", attn), "token_cls", attn, "bf16", seq)


@pytest.mark.parametrize("task,seq", [("seq_cls", 64), ("token_cls", 128)])
def test_minilm_activations(task, seq):
    from memfit.models import load_model

    model = load_model("minilm-l6", task, num_labels=3).model.train()
    _check(model, task, "sdpa", "fp32", seq)


def test_components_sum_and_scale():
    model = tiny_llama("eager")
    spec = spec_for(model, "causal_lm", 2, 64, "fp32", "eager")
    comp = activation_components(spec)
    assert sum(comp.values()) == activation_bytes(spec)
    assert comp["attention"] == spec.model.n_layers * layer_components(spec)["attention"]
    assert comp["weight_casts"] == 0 and comp["logits"] == 0
    # everything but the S² attention probabilities is linear in tokens; eager attention grows faster
    longer = spec.with_(seq=128)
    assert activation_components(longer)["mlp"] == 2 * comp["mlp"]
    assert activation_components(longer)["attention"] > 2 * comp["attention"]
    sdpa = spec.with_(attn_impl="sdpa")
    assert activation_components(sdpa.with_(seq=128))["attention"] < 2.01 * activation_components(sdpa)["attention"]
    # bf16 autocast saves cast copies of every matmul weight; keeping logits adds B·S·V
    assert activation_components(spec.with_(compute_dtype="bf16"))["weight_casts"] > 0
    assert activation_components(spec.with_(extra={"keep_logits": True}))["logits"] == 2 * 64 * 256 * 4
    assert backward_temporaries(spec) > 0


def test_cuda_rules_drop_the_math_fallback():
    model = tiny_bert("seq_cls")
    cpu = spec_for(model, "seq_cls", 2, 256, "fp32", "sdpa")
    cuda = cpu.with_(extra={"device": "cuda"})
    # on CUDA fused SDPA keeps no (B, H, S, S) tensors and dropout masks are 1-byte
    assert activation_bytes(cuda) < activation_bytes(cpu) / 2


def test_meter_does_not_keep_leaf_inputs_alive():
    """MemTracker's module hooks used to hold every leaf tensor a module was called on (and its gradient)
    until the process ended; under the meter, a detached leaf fed to a layer is freed once dropped."""
    import gc
    import weakref

    import torch

    from memfit.memory.measure import MemoryMeter

    layer = torch.nn.Linear(64, 64)
    meter = MemoryMeter(layer)
    with meter.region():
        x = torch.randn(256, 64).requires_grad_(True)
        layer(x).sum().backward()
        alive = weakref.ref(x)
        grad_bytes = meter.current().temporaries
        del x
        gc.collect()
        assert alive() is None
        assert meter.current().temporaries < grad_bytes  # x.grad went with it
