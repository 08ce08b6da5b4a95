import pytest
import torch

from memfit.activations.wta_crs import WTALinearFn, sample_rows
from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.train.build import apply_techniques, wrap_forward_backward

from .conftest import grads_of, hf_loss, make_batch, make_model, measured_activations


def _weight_grad(x, w, gy, k, seed=None, winners=True):
    """∇W of y = x Wᵀ through the sampled function (or plain CRS: no winners) for output gradient gy."""
    w = w.clone().requires_grad_(True)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    if winners:
        y = WTALinearFn.apply(x, w, None, k, gen)
    else:  # column-row sampling with the same probabilities, every row drawn
        p = x.norm(dim=1) / x.norm(dim=1).sum()
        idx = torch.multinomial(p, k, replacement=True, generator=gen)
        return (gy[idx] / (k * p[idx]).unsqueeze(1)).t() @ x[idx]
    y.backward(gy)
    return w.grad


def test_sampled_weight_gradient_is_unbiased_and_beats_crs():
    torch.manual_seed(0)
    n, d_in, d_out, k = 64, 16, 8, 16
    x = torch.randn(n, d_in) * torch.rand(n, 1).pow(3).mul(8)  # a few rows carry most of the norm (winners)
    w, gy = torch.randn(d_out, d_in), torch.randn(n, d_out)
    exact = gy.t() @ x
    draws = torch.stack([_weight_grad(x, w, gy, k, seed=s) for s in range(3000)])
    crs = torch.stack([_weight_grad(x, w, gy, k, seed=s, winners=False) for s in range(3000)])
    mean = draws.mean(0)
    # standard error of the mean ~ std / sqrt(3000): 5 standard errors per element, and the norm within 3 %
    se = draws.std(0) / 3000 ** 0.5
    assert ((mean - exact).abs() <= 5 * se + 1e-5).all()
    assert (mean - exact).norm() / exact.norm() < 0.03
    assert (draws[0] - exact).norm() / exact.norm() > 0.01  # a single draw is an estimate, not the exact sum
    var_wta = (draws - exact).pow(2).sum((1, 2)).mean()
    var_crs = (crs - exact).pow(2).sum((1, 2)).mean()
    assert var_wta < var_crs  # the paper's point: winners taken exactly lower the variance


def test_input_and_bias_gradients_are_exact():
    torch.manual_seed(1)
    x = torch.randn(3, 10, 12, requires_grad=True)
    lin = torch.nn.Linear(12, 6)
    gy = torch.randn(3, 10, 6)
    WTALinearFn.apply(x, lin.weight, lin.bias, 5, torch.Generator().manual_seed(0)).backward(gy)
    x2 = x.detach().clone().requires_grad_(True)
    lin2 = torch.nn.Linear(12, 6)
    lin2.load_state_dict(lin.state_dict())
    lin2(x2).backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(lin.bias.grad, lin2.bias.grad)


def test_full_budget_is_exact_and_winners_cover_all_mass():
    x = torch.zeros(8, 4)
    x[2, 0] = 3.0  # one row holds all the norm: it is the winner, and the estimate is exact
    idx, wts = sample_rows(x, 3)
    assert idx.tolist() == [2] and wts.tolist() == [1.0]
    idx, wts = sample_rows(torch.randn(8, 4), 8)
    assert sorted(idx.tolist()) == list(range(8)) and (wts == 1).all()


def _build(model, spec, **opts):
    techs = [build_technique("activations", {"name": "wta_crs", **opts})]
    ctx = Context(model=model, spec=spec, techniques=techs)
    apply_techniques(ctx)
    return techs, wrap_forward_backward(ctx, loss_fn=hf_loss)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_activation_bytes_measured_equal_estimate(attn):
    model = make_model()
    model.config._attn_implementation = attn
    spec = RunSpec.from_model(model, batch=2, seq=64, attn_impl=attn)
    techs, fb = _build(model, spec, budget=0.25)
    got = measured_activations(model, hf_loss, make_batch(2, 64), fb)
    want = estimate_run(spec, techs).activations
    assert abs(got - want) <= 64, (got, want)  # to the byte but a scalar or two
    assert want < estimate_run(spec, []).activations


def test_training_with_samples_lowers_the_loss_and_resumes():
    batch = make_batch(2, 32)
    model = make_model()
    techs, fb = _build(model, RunSpec.from_model(model, batch=2, seq=32), budget=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = None
    for _ in range(8):
        opt.zero_grad()
        loss = fb(model, batch, 1.0).item()
        first = loss if first is None else first
        opt.step()
    assert loss < first - 0.1
    assert techs[0].state_dict() == {"calls": 8}
    # the same calls count draws the same samples: a rebuilt technique restored from the state agrees
    a, b = make_model(), make_model()
    ta, fa = _build(a, RunSpec.from_model(a, batch=2, seq=32), budget=0.3)
    tb, fbb = _build(b, RunSpec.from_model(b, batch=2, seq=32), budget=0.3)
    ta[0].load_state_dict({"calls": 3})
    tb[0].load_state_dict({"calls": 3})
    fa(a, batch, 1.0)
    fbb(b, batch, 1.0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0)


def test_gradients_differ_from_exact_only_in_weights():
    batch = make_batch(2, 32)
    _, ref = grads_of(make_model(), hf_loss, batch)
    model = make_model()
    _build(model, RunSpec.from_model(model, batch=2, seq=32), budget=0.3)
    _, got = grads_of(model, hf_loss, batch)
    # the top layer's down_proj gradient is sampled; the LM head, embeddings' and norms' are exact only above
    # the first sampled layer: the LM head and final norm
    torch.testing.assert_close(got["lm_head.weight"], ref["lm_head.weight"])
    torch.testing.assert_close(got["model.norm.weight"], ref["model.norm.weight"])
    assert not torch.allclose(got["model.layers.1.mlp.down_proj.weight"], ref["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("other,match", [("checkpointing", "recomputes"), ("mesa", "re-store")])
def test_refuses_combinations(other, match):
    model = make_model()
    techs = [build_technique("activations", "wta_crs"), build_technique("activations", other)]
    with pytest.raises(ConfigError, match=match):
        apply_techniques(Context(model=model, spec=RunSpec.from_model(model), techniques=techs))


def test_refuses_adapters_and_bad_budget():
    model = make_model()
    techs = [build_technique("adapter", {"name": "lora", "r": 2}), build_technique("activations", "wta_crs")]
    with pytest.raises(ConfigError, match="frozen"):
        apply_techniques(Context(model=model, spec=RunSpec.from_model(model), techniques=techs))
    with pytest.raises(ConfigError, match="budget"):
        build_technique("activations", {"name": "wta_crs", "budget": 0})
