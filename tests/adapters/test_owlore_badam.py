import copy
import warnings

import torch

from memfit.memory.spec import RunSpec
from memfit.optim.adamw import AdamWTechnique
from memfit.sampling.layers import layer_index
from memfit.sampling.owlore import outlier_ratio
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .tiny import lm_batch, tiny_llama


class _Data:
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(1)
        self.train = [{"input_ids": torch.randint(0, 64, (16,), generator=g)} for _ in range(n)]

    @staticmethod
    def collate(items):
        return {"input_ids": torch.stack([i["input_ids"] for i in items])}


def test_outlier_ratio_counts_heavy_tail():
    w = torch.ones(4, 10)
    w[0, 0] = 100.0
    assert outlier_ratio(w, None, threshold=5.0) == (1, 40)
    norm = torch.ones(10)
    norm[3] = 1000.0  # a loud input feature makes its column outliers
    assert outlier_ratio(torch.ones(4, 10), norm, threshold=5.0) == (4, 40)


def test_owlore_samples_outlier_heavy_layers_more_often():
    model = tiny_llama(layers=4)
    with torch.no_grad():  # give layer 2 a heavy-tailed spectrum
        for name, p in model.named_parameters():
            if layer_index(name) == 2 and p.ndim == 2:
                p[torch.rand_like(p) < 0.05] *= 50
    tech = build_technique("adapter", {"name": "owlore", "layers": 1, "interval": 1, "calib_batches": 2,
                                       "calib_batch_size": 4})
    ctx = Context(model=model, spec=RunSpec.from_model(model), data=_Data())
    tech.apply(ctx)
    probs = tech.probabilities
    assert abs(sum(probs) - 1) < 1e-9 and max(range(4), key=probs.__getitem__) == 2
    picks = [tech.select(k, 4)[0] for k in range(200)]
    assert picks.count(2) > 200 * probs[2] * 0.7 and picks.count(2) > max(picks.count(i) for i in (0, 1, 3))


def _badam_reference(model, lr, steps, interval):
    from badam import BlockOptimizer

    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = BlockOptimizer(base, list(model.named_parameters()), switch_block_every=interval,
                             switch_mode="descending", verbose=0)
    for step in range(steps):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def test_badam_matches_the_badam_package():
    steps, interval, lr = 5, 2, 1e-2
    ours = tiny_llama(layers=3)
    ref = _badam_reference(copy.deepcopy(ours), lr, steps, interval)
    tech = build_technique("adapter", {"name": "badam", "interval": interval})
    ctx = Context(model=ours, spec=RunSpec.from_model(ours))
    tech.check(ctx)
    tech.apply(ctx)
    # the reference steps with the for-loop AdamW (the fused kernel differs in the last bits)
    ctx.optimizer = AdamWTechnique(AdamWTechnique.Config(name="adamw", lr=lr, fused=False)).build_optimizer(ctx)
    for step in range(steps):
        ctx.step = step + 1  # badam switches after global_step+1 hits K, so its first block gets K-1 steps
        tech.on_step_start(ctx)
        ours(**lm_batch(seed=step)).loss.backward()
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        assert len(ctx.optimizer.state) == sum(1 for n, _ in ours.named_parameters()
                                               if layer_index(n) == tech.active[0])
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert tech.active == [0]  # descending: 2, 1, 1, 0, 0
