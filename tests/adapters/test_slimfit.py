import math

import pytest
import torch

from memfit.activations import _common as c
from memfit.activations import layout as lay
from memfit.activations.layout import layout_of

from memfit.errors import CompatError, ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.models import build_llama
from memfit.optim.common import state_bytes
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.train.build import apply_techniques, build_optimizer, wrap_forward_backward


def _run(bits, steps=6, interval=2, ratio=0.5, seed=0, keep=1.0, attn="sdpa"):
    model = build_llama("llama-tiny", 256, seed=seed, num_hidden_layers=4)
    model.set_attn_implementation(attn)
    model.train()
    spec = RunSpec.from_model(model, batch=2, seq=64, attn_impl=attn)
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


@pytest.mark.parametrize("bits,keep,attn", [(8, 1.0, "sdpa"), (8, 1.0, "eager"), (8, 0.5, "eager"),
                                            (4, 0.25, "eager")])
def test_frozen_layers_activations_quantized_within_bound(bits, keep, attn):
    techs, spec, _, losses, report = _run(bits, keep=keep, attn=attn)
    exact_techs, _, _, exact_losses, exact_report = _run(None, attn=attn)
    est = estimate_run(spec, techs)
    assert report.category_peaks.activations < exact_report.category_peaks.activations
    # an upper bound (frozen layers placed where packing costs most), tight to the packing scratch
    assert 0.8 * est.activations <= report.category_peaks.activations <= 1.06 * est.activations
    # the packed bytes of the frozen layers' saved tensors are the estimate's compressed bytes, up to the
    # per-channel scales and offsets the estimate approximates (one pair per element / token; 4-D attention
    # tensors hold one per head): 8 bytes per channel (≤ the MLP's width) of each of a frozen layer's (≤ 8)
    # packed tensors, 2 frozen layers
    s = spec
    for t in techs:
        s = t.transform_spec(s)
    plans = [p for p in layout_of(s).layers if p.bits]
    assert len(plans) == 2 and all(p.keep == keep for p in plans)
    assert all(p.probs[0] == (spec.batch * spec.model.n_heads * spec.seq ** 2 if attn == "eager" else 0) for p in plans)
    compressed = sum(p.kept(s) for p in plans)
    assert abs(techs[0].packed_bytes - compressed) <= 2 * 8 * 8 * spec.model.intermediate
    assert losses[-1] < losses[0] - 0.5  # still trains
    # compressed saved activations of frozen layers change gradients only slightly: the losses track the exact run
    # (4-bit codes with three quarters of the probabilities pruned drift more: 5 % after 6 steps at lr 1e-2)
    assert abs(losses[-1] - exact_losses[-1]) < (0.05 if bits == 8 else 0.1) * exact_losses[-1]


@pytest.mark.parametrize("bits", [8, 4])
def test_pruning_keeps_the_largest_attention_probabilities_codes_and_a_bitmap(bits):
    torch.manual_seed(0)
    scores = torch.randn(2, 4, 64, 64, requires_grad=True) * 3
    probs = torch.softmax(scores.masked_fill(torch.ones(64, 64).triu(1).bool(), -math.inf), -1)
    keep = 0.3
    hooks = c.CompressHooks(bits, set(), keep=keep)
    back = hooks.unpack(hooks.pack(probs))
    x = probs.detach()
    k = math.ceil(keep * x.numel())
    kept = x > x.flatten().kthvalue(x.numel() - k).values  # the k largest
    assert kept.sum() == k  # 30 % < the causal mask's non-zero half: no ties at the threshold
    codes, scale, lo = c.quantize(x, bits, 1)
    dense = c.dequantize(codes, scale, lo, bits, x.shape, x.dtype)
    # the same codes as dense quantization where kept, zeros elsewhere
    torch.testing.assert_close(back, torch.where(kept, dense, 0.0), rtol=0, atol=0)
    heads = 2 * 4 * 4  # scale and offset per head, fp32
    assert hooks.packed_bytes == lay.pruned_bytes(x.numel(), bits, keep) + heads
    # other saved tensors are quantized, never pruned
    other = hooks.unpack(hooks.pack(scores * 2))
    assert (other != 0).float().mean() > 0.95
    # a tensor whose range is past its dtype's (an additive mask) stays as it is instead of turning into NaN
    mask = torch.zeros(2, 1, 64, 64).masked_fill(torch.ones(64, 64).triu(1).bool(), -math.inf)
    assert hooks.pack(mask) is mask


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


def test_pruning_refused_where_nothing_saves_probabilities_and_checked_at_run_time(monkeypatch):
    with pytest.raises(ConfigError, match="fused"):
        _run(8, steps=1, keep=0.5, attn="sdpa")
    monkeypatch.setattr(c, "SOFTMAX_BACKWARD", ())  # as if the probabilities reached autograd under another node
    with pytest.raises(CompatError, match="pruned nothing"):
        _run(8, steps=4, keep=0.5, attn="eager")
