import math

import pytest
import torch

from memfit.activations import _common as c
from memfit.activations.layout import layout_of

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.models import build_llama
from memfit.optim.common import state_bytes
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.train.build import apply_techniques, build_optimizer, wrap_forward_backward


def _run(bits, steps=6, interval=2, ratio=0.5, seed=0, keep=1.0):
    model = build_llama("llama-tiny", 256, seed=seed, num_hidden_layers=4)
    model.train()
    spec = RunSpec.from_model(model, batch=2, seq=64)
    techs = [build_technique("adapter", {"name": "slimfit", "freeze_ratio": ratio, "interval": interval,
                                         "bits": bits, "keep": keep}),
             build_technique("optimizer", {"name": "adamw", "lr": 1e-2})]
    ctx = Context(model=model, spec=spec, techniques=techs)
    apply_techniques(ctx)
    opt = build_optimizer(techs[1], ctx)
    ctx.optimizer = opt
    fb = wrap_forward_backward(ctx, loss_fn=lambda m, b: m(**b).loss)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    losses, report = [], None
    for step in range(steps):
        ctx.step = step
        techs[0].on_step_start(ctx)
        meter = MemoryMeter(model, opt)
        with meter.region():
            losses.append(fb(model, batch, 1.0).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        report = meter.report()
        techs[0].on_step_end(ctx, {})
    return techs, spec, opt, losses, report


def test_rounds_freeze_the_slowest_layers_by_measured_distance():
    techs, *_ = _run(None, steps=8, interval=2)
    sf = techs[0]
    assert sorted(sf.distance) == [0, 1, 2, 3]  # every layer trained once and was measured
    # the layers training now are the two that moved farthest in their last round
    ranked = sorted(sf.distance, key=lambda i: -sf.distance[i])
    assert sf.active == sorted(ranked[:2])
    assert sf.state_dict()["distance"] == {str(k): v for k, v in sf.distance.items()}


def test_frozen_layers_save_no_linear_inputs_estimate_equals_measured():
    techs, spec, opt, losses, report = _run(None)
    est = estimate_run(spec, techs)
    got = report.category_peaks
    assert abs(got.activations - est.activations) <= 64
    assert got.gradients == est.gradients
    assert state_bytes(opt) <= est.optimizer  # state of the layers that train now (the largest ones estimated)
    full = estimate_run(spec, [techs[1]])
    assert est.activations < full.activations and est.gradients < full.gradients


@pytest.mark.parametrize("bits,keep", [(8, 1.0), (8, 0.5), (4, 0.25)])
def test_frozen_layers_activations_quantized_within_bound(bits, keep):
    techs, spec, _, losses, report = _run(bits, keep=keep)
    exact_techs, _, _, exact_losses, exact_report = _run(None)
    est = estimate_run(spec, techs)
    assert report.category_peaks.activations < exact_report.category_peaks.activations
    # an upper bound (frozen layers placed where packing costs most), tight to the packing scratch
    assert 0.8 * est.activations <= report.category_peaks.activations <= 1.06 * est.activations
    # the packed bytes of the frozen layers' saved tensors are the estimate's compressed bytes, plus the
    # per-channel scales and offsets the estimate neglects: 8 bytes per channel (≤ the MLP's width) or head, of
    # each of a frozen layer's (≤ 8) packed tensors, 2 frozen layers
    s = spec
    for t in techs:
        s = t.transform_spec(s)
    plans = [p for p in layout_of(s).layers if p.bits]
    assert len(plans) == 2 and all(p.keep == keep for p in plans)
    compressed = sum(p.kept(s) for p in plans)
    assert compressed <= techs[0].packed_bytes <= compressed + 2 * 8 * 8 * spec.model.intermediate
    assert losses[-1] < losses[0] - 0.5  # still trains
    # compressed saved activations of frozen layers change gradients only slightly: the losses track the exact run
    assert abs(losses[-1] - exact_losses[-1]) < 0.05 * exact_losses[-1]


@pytest.mark.parametrize("bits", [8, 4])
def test_pruning_keeps_the_largest_entries_codes_and_a_bitmap(bits):
    torch.manual_seed(0)
    x = torch.randn(2, 64, 176) * torch.linspace(0.1, 3, 176)
    x[0, :10] = 0.0  # ties at zero (masked attention, ReLU) are dropped first and restored exactly
    keep = 0.3
    hooks = c.CompressHooks(bits, set(), keep=keep)
    packed = hooks.pack(x)
    back = hooks.unpack(packed)
    k = math.ceil(keep * x.numel())
    kept = back != 0
    assert kept.sum() == k
    threshold = x.abs().flatten().kthvalue(x.numel() - k).values
    assert torch.equal(kept, x.abs() > threshold)  # the k entries of largest magnitude
    codes, scale, lo = c.quantize(x, bits, -1)
    dense = c.dequantize(codes, scale, lo, bits, x.shape, x.dtype)
    torch.testing.assert_close(back[kept], dense[kept], rtol=0, atol=0)  # the same codes as dense quantization
    channels = 2 * 176 * 4  # scale and offset per last-dim channel, fp32
    assert hooks.packed_bytes == math.ceil(k * bits / 8) + math.ceil(x.numel() / 8) + channels


@pytest.mark.parametrize("opts,match", [({"bits": 3}, "bits"), ({"freeze_ratio": 1.0}, "freeze_ratio"),
                                        ({"bits": None, "keep": 0.5}, "keep"), ({"keep": 0}, "keep")])
def test_bad_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        build_technique("adapter", {"name": "slimfit", **opts})


def test_refuses_activation_techniques_that_restore_the_same_tensors():
    model = build_llama("llama-tiny", 256, seed=0)
    techs = [build_technique("adapter", "slimfit"), build_technique("activations", "mesa")]
    with pytest.raises(ConfigError, match="mesa"):
        apply_techniques(Context(model=model, spec=RunSpec.from_model(model), techniques=techs))
