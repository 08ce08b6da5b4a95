"""16-bit weights: stochastic rounding (Zamirai et al. 2020) and fp32 master weights (`optim/precision.py`)."""

from __future__ import annotations

import pytest
import torch

from memfit.optim.precision import PrecisionOptimizer, stochastic_round


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, generator=g) - 0.5) * 8
    draws = torch.stack([stochastic_round(x, dtype, g).float() for _ in range(4000)])
    lo, hi = draws.min(0).values, draws.max(0).values
    assert torch.all(lo <= x) and torch.all(x <= hi)
    assert torch.all((draws == lo) | (draws == hi))
    gap = (hi - lo).clamp_min(1e-12)
    # mean within 4 standard errors of x (Bernoulli between the two neighbours)
    assert torch.all((draws.mean(0) - x).abs() <= 4 * gap * 0.5 / 4000 ** 0.5 + 1e-7)


def test_bf16_rule_has_torchaos_expectation():
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1.0 to the next bf16 (1 + 2^-7)
    ours = stochastic_round(x, torch.bfloat16, torch.Generator().manual_seed(0)).float()
    theirs = quant_utils._fp32_to_bf16_sr(x).float()
    assert set(ours.unique().tolist()) == set(theirs.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(ours.mean().item() - theirs.mean().item()) < 3e-5
    assert abs(ours.mean().item() - x[0].item()) < 3e-5


def _sgd_steps(master: bool, stochastic: bool, steps: int = 400) -> torch.Tensor:
    w = torch.nn.Parameter(torch.ones(512, dtype=torch.bfloat16))
    opt = PrecisionOptimizer(torch.optim.SGD([w], lr=1e-4), master_weights=master, stochastic=stochastic)
    for _ in range(steps):
        w.grad = torch.ones_like(w)
        opt.step()
    return w.detach().float()


def test_updates_below_half_an_ulp_still_move_the_weights():
    """lr·g = 1e-4 is below half a bf16 ulp at 1.0 (2^-8): round-to-nearest never moves, stochastic rounding and
    a master copy move by 400 · 1e-4 = 0.04 (on average / exactly)."""
    assert torch.all(_sgd_steps(master=False, stochastic=False) == 1.0)
    sr = _sgd_steps(master=False, stochastic=True)
    assert abs(sr.mean().item() - 0.96) < 0.002
    master = _sgd_steps(master=True, stochastic=False)
    assert torch.allclose(master, torch.full_like(master, 0.96), atol=2**-8)


def test_master_weights_follow_the_fp32_trajectory_exactly():
    torch.manual_seed(0)
    w32 = torch.nn.Parameter(torch.randn(16, 8).to(torch.bfloat16).float())  # the master starts from the weight
    w16 = torch.nn.Parameter(w32.detach().to(torch.bfloat16))
    ref = torch.optim.AdamW([w32], lr=1e-2, foreach=False)
    opt = PrecisionOptimizer(torch.optim.AdamW([w16], lr=1e-2, foreach=False), master_weights=True)
    for _ in range(5):
        g = torch.randn(16, 8).to(torch.bfloat16)
        w32.grad, w16.grad = g.float(), g
        ref.step()
        opt.step()
        assert torch.equal(opt.master[w16], w32.detach())
        assert torch.equal(w16.detach(), w32.detach().to(torch.bfloat16))
    assert opt.state[w16]["master"] is opt.master[w16] and opt.state[w16]["exp_avg"].dtype == torch.float32
    opt.state.pop(w16)  # a layer sampler frees a deactivated layer's state: the master goes with it
    assert w16 not in opt.master and w16 not in opt.optimizer.state


def test_lisa_with_master_weights_keeps_masters_of_active_layers_only(data_dir):
    from memfit.bench.technique_matrix import matrix_recipe, measure_recipe

    recipe = matrix_recipe("lisa", "bf16-true", data_dir, master_weights="fp32")
    row = measure_recipe(recipe)
    assert "crash" not in row and "refused" not in row, row
    assert abs(row["optimizer_ratio"] - 1) <= 1e-3 and row["step_peak_ratio"] <= 1.02, row


@pytest.mark.parametrize("master", ["none", "fp32"])
def test_bf16_true_resumes_bit_identically(master, data_dir, tmp_path):
    from memfit.recipe import load_recipe
    from train.recipes import resumed_losses_match, toy_recipe

    recipe = load_recipe(toy_recipe("pretrain", data_dir, steps=6, save_every=3, measure_steps=0, eval_every=0,
                                    precision="bf16-true", master_weights=master))
    assert resumed_losses_match(recipe, tmp_path)
