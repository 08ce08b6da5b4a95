import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.optim.adamw import AdamWTechnique
from memfit.sampling.layers import layer_index
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .tiny import lm_batch, tiny_llama


def _run(adapter, steps, layers=4, ctx_seed=0, meter_from=None):
    model = tiny_llama(layers=layers)
    spec = RunSpec.from_model(model, batch=2, seq=16)
    tech = build_technique("adapter", adapter)
    ctx = Context(model=model, spec=spec, seed=ctx_seed)
    tech.check(ctx)
    tech.apply(ctx)
    opt_tech = AdamWTechnique()
    ctx.optimizer = opt_tech.build_optimizer(ctx)
    meter = MemoryMeter(ctx.model, ctx.optimizer)
    history = []
    for step in range(steps):
        ctx.step = step
        tech.on_step_start(ctx)
        batch = lm_batch(seed=step)
        if meter_from is not None and step >= meter_from:
            with meter.region():
                ctx.model(**batch).loss.backward()
                ctx.optimizer.step()
        else:
            ctx.model(**batch).loss.backward()
            ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        tech.on_step_end(ctx, {})  # checks that inactive layers got no gradient and no optimizer state
        history.append(tech.active)
    return tech, ctx, spec, opt_tech, meter, history


def _state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def test_after_a_switch_only_active_layers_hold_state_and_measured_equals_estimate():
    tech, ctx, spec, opt_tech, meter, history = _run({"name": "lisa", "layers": 1, "interval": 2}, 6, meter_from=4)
    assert len({tuple(h) for h in history}) > 1  # it did switch
    active = set(tech.active)
    for name, p in ctx.model.named_parameters():
        i = layer_index(name)
        if i is not None and i not in active:
            assert p.grad is None and p not in ctx.optimizer.state and not p.requires_grad
    est = estimate_run(spec, [tech, opt_tech])
    assert meter.current().optimizer == est.optimizer == _state_bytes(ctx.optimizer)
    assert meter.report().category_peaks.gradients == est.gradients


def test_without_freeing_state_grows_like_lmflow():
    tech, ctx, spec, opt_tech, *_ = _run({"name": "lisa", "layers": 1, "interval": 1, "free_state": False}, 8)
    est = estimate_run(spec, [tech, opt_tech])
    assert _state_bytes(ctx.optimizer) > est.optimizer  # the anchor bug the default avoids


def test_embeddings_and_head_always_train_and_layers_follow_the_schedule():
    _tech, ctx, *_, history = _run({"name": "lisa", "layers": 2, "interval": 3}, 7)
    named = dict(ctx.model.named_parameters())
    assert named["model.embed_tokens.weight"].requires_grad and named["lm_head.weight"].requires_grad
    assert all(len(h) == 2 for h in history)
    assert history[0] == history[1] == history[2] and history[3] == history[4] == history[5]


def test_resume_reproduces_the_selection():
    tech, _ctx, *_ , history = _run({"name": "lisa", "layers": 2, "interval": 2}, 5)
    state = tech.state_dict()
    model = tiny_llama(layers=4)
    fresh = build_technique("adapter", {"name": "lisa", "layers": 2, "interval": 2})
    c2 = Context(model=model, spec=RunSpec.from_model(model), seed=123)  # seed comes from the saved state
    fresh.apply(c2)
    fresh.load_state_dict(state)
    c2.step = 5
    fresh.on_step_start(c2)
    assert fresh.active == history[-1]
    c2.step = 6
    fresh.on_step_start(c2)
    _tech2, *_, h2 = _run({"name": "lisa", "layers": 2, "interval": 2}, 7)
    assert fresh.active == h2[6]
    trainable = {layer_index(n) for n, p in model.named_parameters() if p.requires_grad} - {None}
    assert trainable == set(fresh.active)


def test_gamma_larger_than_layer_count_is_a_config_error():
    model = tiny_llama(layers=2)
    tech = build_technique("adapter", {"name": "lisa", "layers": 3})
    with pytest.raises(ConfigError, match="only 2 layers"):
        tech.check(Context(model=model, spec=RunSpec.from_model(model)))
    with pytest.raises(ConfigError):
        build_technique("adapter", {"name": "lisa", "layers": 0})


def test_layerwise_optimizer_is_refused():
    model = tiny_llama(layers=2)
    lisa = build_technique("adapter", {"name": "lisa", "layers": 1})
    layerwise = build_technique("optimizer", {"name": "adamw", "layerwise": True})
    ctx = Context(model=model, spec=RunSpec.from_model(model), techniques=[lisa, layerwise])
    with pytest.raises(ConfigError, match="layerwise: false"):
        lisa.check(ctx)


def test_state_made_for_an_inactive_layer_is_a_compat_error():
    """An optimizer that made state for switched-off layers (not lazily from .grad, as torch's do) would hold
    full fine-tuning's memory: the sampler must refuse."""
    from memfit.errors import CompatError

    tech, ctx, *_ = _run({"name": "lisa", "layers": 1, "interval": 2}, 1)
    off = next(p for n, p in ctx.model.named_parameters()
               if layer_index(n) is not None and layer_index(n) not in tech.active)
    ctx.optimizer.state[off] = {"exp_avg": torch.zeros_like(off)}
    with pytest.raises(CompatError, match=r"optimizer state.*inactive layers.*torch \d"):
        tech.on_step_end(ctx, {})
