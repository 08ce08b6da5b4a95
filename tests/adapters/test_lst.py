import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .tiny import cls_batch, lm_batch, tiny_bert, tiny_llama


def _lst(model, task, **opts):
    spec = RunSpec.from_model(model, task=task, batch=2, seq=16)
    tech = build_technique("adapter", {"name": "lst", "reduction": 4, **opts})
    ctx = Context(model=model, spec=spec)
    tech.check(ctx)
    tech.apply(ctx)
    return tech, ctx, spec


def _infos(params):
    return sorted((p.name, tuple(p.shape), p.trainable) for p in params)


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls", "token_cls"])
def test_side_network_trains_backbone_frozen_and_spec_matches(task):
    model = (tiny_llama() if task == "causal_lm" else tiny_bert(task)).eval()
    batch = lm_batch() if task == "causal_lm" else cls_batch(task)
    with torch.no_grad():
        ref = model(**batch).logits
    tech, ctx, spec = _lst(model, task)
    out = ctx.model(**batch)
    torch.testing.assert_close(out.logits, ref)  # zero-initialised up-projection: starts at the backbone
    out.loss.backward()
    for n, p in ctx.model.named_parameters():
        head = "classifier" in n and task != "causal_lm"
        if n.startswith("backbone.") and not head:
            assert p.grad is None and not p.requires_grad
        else:
            assert p.requires_grad
    assert ctx.model.side.downs[1].weight.grad is not None
    assert _infos(tech.transform_spec(spec).model.params) == _infos(RunSpec.from_model(ctx.model).model.params)


def _activations(model, tech_cfg):
    batch = lm_batch(seq=16)
    spec = RunSpec.from_model(model, batch=2, seq=16)
    ctx = Context(model=model, spec=spec)
    techs = []
    if tech_cfg is not None:
        tech = build_technique("adapter", tech_cfg)
        tech.apply(ctx)
        techs.append(tech)
    meter = MemoryMeter(ctx.model)
    with meter.region():
        loss = ctx.model(**batch).loss
        kept = meter.current().activations  # what forward left alive for backward
        loss.backward()
    return kept, estimate_run(spec, techs).activations


def test_no_backbone_activations_are_stored_for_backward():
    small, big = tiny_llama(), tiny_llama()
    big = __import__("memfit.models", fromlist=["x"]).build_llama("llama-tiny", 64, intermediate_size=704)
    lst_small, est_small = _activations(tiny_llama(), {"name": "lst", "reduction": 4})
    lst_big, _ = _activations(big, {"name": "lst", "reduction": 4})
    full_small, _ = _activations(small, None)
    full_big, _ = _activations(__import__("memfit.models", fromlist=["x"]).build_llama(
        "llama-tiny", 64, intermediate_size=704), None)
    assert lst_small == lst_big  # a 4x wider backbone MLP costs LST nothing: its activations are not kept
    assert full_big > full_small
    assert lst_small < full_small
    assert 0.6 < lst_small / est_small < 1.4


def test_bad_reduction_is_a_config_error():
    model = tiny_llama()
    tech = build_technique("adapter", {"name": "lst", "reduction": 4, "heads": 3})
    with pytest.raises(ConfigError, match="divisible"):
        tech.check(Context(model=model, spec=RunSpec.from_model(model)))


def test_backbone_without_hidden_states_is_a_compat_error(monkeypatch):
    """The side network reads every layer's hidden state; a transformers that stops returning them must fail."""
    from types import SimpleNamespace

    from memfit.adapters.lst import LadderSideModel
    from memfit.errors import CompatError

    _, ctx, _ = _lst(tiny_llama(), "causal_lm")
    monkeypatch.setattr(LadderSideModel, "_core",
                        lambda self: lambda **kw: SimpleNamespace(hidden_states=None, last_hidden_state=None))
    with pytest.raises(CompatError, match=r"0 hidden states.*transformers \d"):
        ctx.model(**lm_batch())
