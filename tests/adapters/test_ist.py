import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.spec import RunSpec
from memfit.optim.adamw import AdamWTechnique
from memfit.sampling.layers import layer_index
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.train.step import model_loss

from .tiny import lm_batch, tiny_llama


def _setup(layers=4, **opts):
    model = tiny_llama(layers=layers)
    spec = RunSpec.from_model(model, batch=2, seq=16)
    tech = build_technique("adapter", {"name": "ist", "r": 2, "layers": 1, **opts})
    ctx = Context(model=model, spec=spec, loss_fn=model_loss)
    tech.check(ctx)
    tech.apply(ctx)
    return tech, ctx, spec


def test_suppressing_an_important_layer_raises_its_score():
    tech, ctx, _ = _setup(probes=16, beta=0.0)
    batch = lm_batch()
    adapter2 = [p for n, p in ctx.model.named_parameters() if ".lora_" in n and layer_index(n) == 2]
    opt = torch.optim.SGD(adapter2, lr=0.5)
    for _ in range(10):  # only layer 2's adapter learns this batch, so silencing it hurts
        model_loss(ctx.model, batch).backward()
        opt.step()
        ctx.model.zero_grad(set_to_none=True)
    tech.update_importance(ctx, batch, model_loss)
    assert max(range(4), key=tech.scores.__getitem__) == 2 and tech.scores[2] > 0
    assert int(tech.probabilities().argmax()) == 2


def test_only_active_layer_adapters_train_and_estimate_matches():
    tech, ctx, spec = _setup(interval=1, update_every=2)
    opt_tech = AdamWTechnique()
    ctx.optimizer = opt_tech.build_optimizer(ctx)
    fb = tech.wrap_forward_backward(lambda m, b, s: (model_loss(m, b) * s).backward(), ctx)
    for step in range(3):
        ctx.step = step
        tech.on_step_start(ctx)
        fb(ctx.model, lm_batch(seed=step), 1.0)
        ctx.optimizer.step()
        for n, p in ctx.model.named_parameters():
            i = layer_index(n)
            if ".lora_" in n and i not in tech.active:
                assert p.grad is None and p not in ctx.optimizer.state
        ctx.optimizer.zero_grad(set_to_none=True)
    est = estimate_run(spec, [tech, opt_tech])
    state = sum(t.numel() * t.element_size() for s in ctx.optimizer.state.values() for t in s.values())
    assert state == est.optimizer
    assert tech.state_dict()["chosen"] == tech.active


def test_ist_layers_beyond_model_is_config_error():
    model = tiny_llama(layers=2)
    tech = build_technique("adapter", {"name": "ist", "layers": 5})
    with pytest.raises(ConfigError, match="only 2 layers"):
        tech.check(Context(model=model, spec=RunSpec.from_model(model)))


def test_lora_layers_it_cannot_silence_are_a_compat_error(monkeypatch):
    """IST scores layers by zeroing peft's per-adapter `scaling`; a peft without it would leave every score 0."""
    from memfit.adapters.lora import LoRA
    from memfit.errors import CompatError

    original = LoRA.apply

    def apply_without_scaling(self, ctx):
        original(self, ctx)
        for m in ctx.model.modules():
            if hasattr(m, "lora_A"):
                m.scaling = 1.0  # not a per-adapter dict any more
    monkeypatch.setattr(LoRA, "apply", apply_without_scaling)
    with pytest.raises(CompatError, match=r"cannot silence.*peft \d"):
        _setup()
