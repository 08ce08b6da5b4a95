"""The SPSA core: bit-exact restore, unbiasedness on a quadratic, n-SPSA averaging, forward gradient = jvp."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memfit.zo.forward_grad import ForwardGradient
from memfit.zo.mezo import ZOSGD
from memfit.zo.spsa import grid_step

from .helpers import SPSA_VARIANTS, lm_batch, snapshot, technique_and_step, tiny_model


@pytest.mark.parametrize("name", SPSA_VARIANTS)
def test_parameters_restored_bit_exactly_when_lr_is_zero(name):
    model, batch = tiny_model(), lm_batch()
    _, ctx, step = technique_and_step(name, model, batch, lr=0.0, eps=1e-3, n_spsa=2)
    before = snapshot(model)  # after the optimizer was built (it rounds parameters onto their grid once)
    step([batch])
    assert any(p != 0 for p in ctx.optimizer.last_projected)  # the model really was perturbed
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_grid_rounding_at_build_is_at_most_half_a_grid_step():
    model = tiny_model()
    before = snapshot(model)
    ZOSGD(list(model.parameters()), lr=0.0, eps=1e-3)
    for n, p in model.named_parameters():
        assert (p - before[n]).abs().max() <= grid_step(before[n], 1e-3) / 2, n


def test_float_arithmetic_mode_leaves_ulp_drift():
    """Why `exact` exists: MeZO's +εz, −2εz, +εz in plain float arithmetic does not return to θ."""
    model, batch = tiny_model(), lm_batch()
    opt = ZOSGD(list(model.parameters()), lr=0.0, eps=1e-3, exact=False)
    before = snapshot(model)
    opt.step(lambda: model(**batch).loss)
    drift = [(p - before[n]).abs().max() / before[n].abs().max() for n, p in model.named_parameters()]
    assert max(drift) > 0
    assert max(drift) < 1e-5  # a few ulps, not an error in the method


class Quadratic(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        m = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / dim + torch.eye(dim, dtype=torch.float64))
        self.register_buffer("b", torch.randn(dim, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def grad(self) -> torch.Tensor:
        return self.A @ self.theta.detach() + self.b


def test_spsa_estimate_is_unbiased_on_a_quadratic():
    """E[uᵀĝ] = uᵀ∇L; for Gaussian z, Var(uᵀĝ) = |g|²|u|² + (gᵀu)², so 4 standard errors bound the mean."""
    q = Quadratic(6)
    opt = ZOSGD([q.theta], lr=0.0, eps=1e-2, seed=3)
    g = q.grad()
    u = torch.zeros(6, dtype=torch.float64)
    u[0], u[3] = 0.6, 0.8
    n = 1500
    samples = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        z = opt.perturbation(q.theta, step=i)
        opt.step(q)
        samples[i] = opt.last_projected[0] * (z.double() @ u)
    expected = float(g @ u)
    sd = math.sqrt(float(g @ g) * float(u @ u) + expected**2)
    assert abs(float(samples.mean()) - expected) < 4 * sd / math.sqrt(n)
    # the variance formula itself holds (sample variance within 4 of its own standard errors, ~√(2/n) relative)
    assert abs(float(samples.var()) / sd**2 - 1) < 4 * math.sqrt(8 / n)


def test_projected_gradient_is_the_directional_derivative():
    """On a quadratic the central difference is exact: proj = zᵀ∇L (up to the grid rounding of εz)."""
    q = Quadratic(5)
    opt = ZOSGD([q.theta], lr=0.0, eps=1e-3)
    z = opt.perturbation(q.theta, step=0)
    opt.step(q)
    assert opt.last_projected[0] == pytest.approx(float(z.double() @ q.grad()), rel=1e-6)


def test_n_spsa_update_is_the_mean_of_the_samples():
    q = Quadratic(5)
    lr = 0.1
    opt = ZOSGD([q.theta], lr=lr, eps=1e-3, n_spsa=3, seed=7)
    theta0 = q.theta.detach().clone()
    zs = [opt.perturbation(q.theta, step=0, sample=i).double() for i in range(3)]
    opt.step(q)
    expected = -lr * sum(p * z for p, z in zip(opt.last_projected, zs)) / 3
    # the estimate is accumulated in float32 (z's dtype): ~1e-7 relative error on the update
    torch.testing.assert_close(q.theta.detach() - theta0, expected, rtol=1e-5, atol=1e-9)


def test_forward_gradient_equals_jvp_and_backprop():
    model, batch = tiny_model(), lm_batch()
    params = dict(model.named_parameters())
    opt = ForwardGradient(list(params.values()), model=model, lr=0.0, seed=5)
    loss, directional = opt.directional_derivative(lambda: model(**batch).loss)
    tangents = {n: opt._tangent(0, i) for i, n in enumerate(params)}
    primals = {n: p.detach() for n, p in params.items()}

    def f(ps):
        return torch.func.functional_call(model, ps, args=(), kwargs=batch).loss

    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        ref_loss, ref = torch.func.jvp(f, (primals,), (tangents,))
    assert loss == pytest.approx(float(ref_loss), rel=1e-6)
    assert directional == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    model.zero_grad()
    model(**batch).loss.backward()
    by_backprop = sum(float((p.grad * tangents[n]).sum()) for n, p in params.items())
    assert directional == pytest.approx(by_backprop, rel=1e-4, abs=1e-5)


def test_forward_gradient_update_is_minus_lr_jvp_v():
    model, batch = tiny_model(), lm_batch()
    params = list(model.parameters())
    opt = ForwardGradient(params, model=model, lr=0.01, seed=2)
    before = [p.detach().clone() for p in params]
    tangents = [opt._tangent(0, i) for i in range(len(params))]
    opt.step(lambda: model(**batch).loss)
    d = opt.last_projected[0]
    for p, b, v in zip(params, before, tangents):
        torch.testing.assert_close(p.detach(), b - 0.01 * d * v)
