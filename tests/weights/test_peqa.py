"""PEQA: sub-4-bit weights with only the per-channel scales trainable."""

import pytest
import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import measure
from memfit.memory.spec import RunSpec
from memfit.models import build_llama
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.weights import apply_weights, load_quantized, save_quantized
from memfit.weights.quant import QuantLinear, unit_codes


@pytest.mark.parametrize("fmt,group", [("int4", 0), ("int3", 16), ("int8", 0)])
def test_scale_gradient_matches_autograd_reference(fmt, group):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(40, 24), fmt, group)
    s = q.make_scale_trainable()
    x = torch.randn(3, 5, 40, requires_grad=True)
    g = torch.randn(3, 5, 24)
    q(x).backward(g)
    # reference: W = codes * s built with ordinary autograd ops
    s_ref = s.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    codes = unit_codes(fmt, q.tensors(), 24, q.padded_in)
    w = (codes * s_ref[..., None]).reshape(24, -1)[:, :40]
    (nn.functional.linear(x_ref, w, q.bias)).backward(g)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [3, 4])
def test_only_scales_change_after_a_step(bits, tmp_path):
    model = build_llama("llama-tiny", 256, seed=0)
    spec = RunSpec.from_model(model, batch=2, seq=16)
    tech = build_technique("adapter", {"name": "peqa", "bits": bits})
    ctx = Context(model=model, spec=spec)
    tech.check(ctx)
    tech.apply(ctx)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".scale") for n in trainable)
    n_scales = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_scales == sum(m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    loss0, report = measure(step, model, opt)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == trainable
    est = estimate_run(spec, [tech])
    assert report.peak.parameters == est.parameters
    assert report.category_peaks.gradients == est.gradients == 4 * n_scales
    for _ in range(5):
        loss = step()
    assert loss < loss0  # training the scales alone lowers the loss on a fixed batch
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_peqa_errors():
    with pytest.raises(ConfigError):
        build_technique("adapter", {"name": "peqa", "bits": 2})
    model = build_llama("llama-tiny", 256)
    apply_weights(model, "nf4")
    tech = build_technique("adapter", {"name": "peqa"})
    with pytest.raises(ConfigError, match="remove the 'weights'"):
        tech.check(Context(model=model, spec=RunSpec.from_model(model)))
    with pytest.raises(ConfigError, match="PEQA needs"):
        QuantLinear(64, 8, "nf4").make_scale_trainable()
