import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.optim.adamw import AdamWTechnique
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .tiny import cls_batch, lm_batch, tiny_bert, tiny_llama


def _apply(model, task, adapter, **run):
    spec = RunSpec.from_model(model, task=task, **run)
    tech = build_technique("adapter", adapter)
    ctx = Context(model=model, spec=spec)
    tech.check(ctx)
    tech.apply(ctx)
    return tech, ctx, spec


def _infos(params):
    return sorted((p.name, tuple(p.shape), float(p.bytes_per_element), p.trainable) for p in params)


@pytest.mark.parametrize("name", ["lora", "dora"])
@pytest.mark.parametrize("task,dtype", [("causal_lm", torch.float32), ("causal_lm", torch.bfloat16),
                                        ("seq_cls", torch.float32), ("token_cls", torch.float32)])
def test_transform_spec_matches_the_live_peft_model(name, task, dtype):
    model = (tiny_llama() if task == "causal_lm" else tiny_bert(task)).to(dtype)
    tech, ctx, spec = _apply(model, task, {"name": name, "r": 4, "alpha": 8})
    predicted = tech.transform_spec(spec).model.params
    live = RunSpec.from_model(ctx.model, task=task).model.params
    assert _infos(predicted) == _infos(live)
    adapters = [p for p in live if "lora_" in p.name]
    assert adapters and all(p.bytes_per_element == 4 for p in adapters)  # peft upcasts adapters to fp32
    if task != "causal_lm":  # the randomly initialised head trains
        assert any("classifier.modules_to_save" in p.name and p.trainable for p in live)


def test_explicit_targets_wrap_only_those_modules():
    model = tiny_llama()
    tech, ctx, spec = _apply(model, "causal_lm", {"name": "lora", "r": 2, "target": ["q_proj", "v_proj"]})
    wrapped = {n.split(".lora_A")[0] for n, _ in ctx.model.named_parameters() if ".lora_A." in n}
    assert len(wrapped) == 2 * 2 and all(n.endswith(("q_proj", "v_proj")) for n in wrapped)
    assert _infos(tech.transform_spec(spec).model.params) == _infos(RunSpec.from_model(ctx.model).model.params)


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_frozen_params_get_no_grad_or_state_and_memory_matches_estimate(task):
    torch.manual_seed(0)
    model = tiny_llama() if task == "causal_lm" else tiny_bert(task)
    batch = lm_batch() if task == "causal_lm" else cls_batch(task)
    tech, ctx, spec = _apply(model, task, {"name": "lora", "r": 4}, batch=2, seq=16)
    opt_tech = AdamWTechnique()
    opt = opt_tech.build_optimizer(ctx)
    meter = MemoryMeter(ctx.model, opt)
    for _ in range(2):
        with meter.region():
            ctx.model(**batch).loss.backward()
            opt.step()
        frozen = [p for p in ctx.model.parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)
        assert all(p not in opt.state for p in frozen)
        opt.zero_grad(set_to_none=True)
    est = estimate_run(spec, [tech, opt_tech])
    rep = meter.report()
    assert rep.category_peaks.parameters == est.parameters
    assert rep.category_peaks.gradients == est.gradients
    assert meter.current().optimizer == est.optimizer  # state held between steps (step temporaries excluded)
    trainable_bytes = sum(p.numel() * p.element_size() for p in ctx.model.parameters() if p.requires_grad)
    assert est.gradients == trainable_bytes


def test_lora_update_changes_only_adapters_and_starts_at_base_output():
    model = tiny_llama()
    batch = lm_batch()
    with torch.no_grad():
        before = model(**batch).logits
    _, ctx, _ = _apply(model, "causal_lm", {"name": "lora", "r": 4})
    with torch.no_grad():
        after = ctx.model(**batch).logits
    torch.testing.assert_close(before, after)  # B = 0 at init


def test_generic_peft_tuner_estimate_is_exact():
    model = tiny_llama()
    adapter = {"name": "peft", "method": "ia3", "target": ["k_proj", "v_proj", "down_proj"],
               "options": {"feedforward_modules": ["down_proj"]}}
    tech, ctx, spec = _apply(model, "causal_lm", adapter)
    assert _infos(tech.transform_spec(spec).model.params) == _infos(RunSpec.from_model(ctx.model).model.params)


@pytest.mark.parametrize("bad,match", [
    ({"name": "lora", "r": 0}, "r"),
    ({"name": "lora", "r": -2}, "r"),
    ({"name": "lora", "rank": 4}, "unknown key 'rank'"),
    ({"name": "dora", "dropout": 1.5}, "dropout"),
])
def test_bad_options_are_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_technique("adapter", bad)


def test_target_matching_no_module_is_a_config_error():
    model = tiny_llama()
    tech = build_technique("adapter", {"name": "lora", "target": ["query_proj"]})
    spec = RunSpec.from_model(model)
    with pytest.raises(ConfigError, match="matches no module.*q_proj"):
        tech.check(Context(model=model, spec=spec))
    with pytest.raises(ConfigError, match="matches no module"):
        tech.transform_spec(spec)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_activation_estimate_matches_measured(name):
    """What forward saves for backward under LoRA / DoRA (DoRA adds the base and LoRA outputs of every wrapped
    layer for its magnitude rescale) equals the estimate within 5 % on a BERT classifier."""
    model = tiny_bert("seq_cls", layers=2)  # BERT's default dropout 0.1, as the estimate assumes
    batch = cls_batch("seq_cls", batch=4, seq=48)
    tech, ctx, spec = _apply(model, "seq_cls", {"name": name, "r": 4}, batch=4, seq=48)
    meter = MemoryMeter(ctx.model)
    with meter.region():
        loss = ctx.model(**batch).loss
        saved = meter.current().activations
        loss.backward()
    est = estimate_run(spec, [tech]).activations
    assert abs(saved / est - 1) < 0.05, (saved, est)


@pytest.mark.parametrize("name", ["lora", "dora", "qlora"])
def test_a_peft_that_wraps_nothing_is_a_compat_error(monkeypatch, name):
    """If peft stops injecting (an API change), applying the adapter must fail, not train the full model."""
    import peft

    from memfit.errors import CompatError

    monkeypatch.setattr(peft, "get_peft_model", lambda model, config, **kw: model)
    with pytest.raises(CompatError, match=r"were not wrapped.*peft \d"):
        _apply(tiny_llama(), "causal_lm", {"name": name, "r": 2})


def test_qlora_without_peft_custom_modules_is_a_compat_error(monkeypatch):
    import peft

    from memfit.errors import CompatError

    monkeypatch.delattr(peft.LoraConfig, "_register_custom_module")
    with pytest.raises(CompatError, match="_register_custom_module"):
        _apply(tiny_llama(), "causal_lm", {"name": "qlora", "r": 2})
