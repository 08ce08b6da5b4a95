"""UniPT and SHERL (side-network adapters beside LST): start at the backbone, train only their part, and their
estimates equal the measured activations and gradients to the byte."""

import pytest
import torch

from memfit.errors import CompatError, ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .tiny import cls_batch, lm_batch, tiny_bert, tiny_llama

METHODS = [{"name": "unipt", "reduction": 4}, {"name": "sherl", "reduction": 4},
           {"name": "sherl", "reduction": 4, "late": 2}, {"name": "unipt", "reduction": 4, "train_head": True}]


def _setup(cfg, task, batch=2, seq=16, layers=3):
    model = tiny_llama(layers=layers) if task == "causal_lm" else tiny_bert(task, layers=layers)
    data = lm_batch(batch=batch, seq=seq) if task == "causal_lm" else cls_batch(task, batch=batch, seq=seq)
    spec = RunSpec.from_model(model, task=task, batch=batch, seq=seq)
    tech = build_technique("adapter", cfg)
    ctx = Context(model=model, spec=spec)
    tech.check(ctx)
    return model, data, spec, tech, ctx


def _infos(params):
    return sorted((p.name, tuple(p.shape), p.trainable) for p in params)


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: f"{c['name']}-{c.get('late', '')}{c.get('train_head', '')}")
@pytest.mark.parametrize("task", ["causal_lm", "seq_cls", "token_cls"])
def test_starts_at_backbone_trains_its_part_and_spec_matches(cfg, task):
    model, data, spec, tech, ctx = _setup(cfg, task)
    model.eval()
    with torch.no_grad():
        ref = model(**data).logits
    tech.apply(ctx)
    out = ctx.model(**data)
    torch.testing.assert_close(out.logits, ref)  # zero-initialised up-projection: starts at the backbone
    out.loss.backward()
    assert _infos(tech.transform_spec(spec).model.params) == _infos(RunSpec.from_model(ctx.model).model.params)
    trained = {n for n, p in ctx.model.named_parameters() if p.grad is not None}
    side = {n for n in trained if n.startswith(("side.", "sherl_route."))}
    assert side and all(p.grad is not None for n, p in ctx.model.named_parameters()
                        if n.startswith(("side.", "sherl_route.")))
    embeddings = [n for n, _ in ctx.model.named_parameters() if "embed" in n]
    assert embeddings and not trained & set(embeddings)  # the frozen backbone gets no gradient


@pytest.mark.parametrize("cfg", METHODS[:3], ids=lambda c: f"{c['name']}-{c.get('late', '')}")
@pytest.mark.parametrize("task", ["causal_lm", "seq_cls", "token_cls"])
@pytest.mark.parametrize("shape", [(2, 16), (3, 8)])
def test_estimate_equals_measured(cfg, task, shape):
    model, data, spec, tech, ctx = _setup(cfg, task, *shape)
    tech.apply(ctx)
    meter = MemoryMeter(ctx.model)
    with meter.region():
        loss = ctx.model(**data).loss
        kept = meter.current().activations  # what forward left alive for backward
        loss.backward()
    est = estimate_run(spec, [tech])
    assert kept == est.activations
    assert sum(p.grad.nbytes for p in ctx.model.parameters() if p.grad is not None) == est.gradients
    assert meter.report().peak.parameters == est.parameters


def test_memory_does_not_follow_backbone_width():
    """Only the layer outputs are kept: a 4x wider backbone MLP costs the side networks nothing."""
    from memfit.models import build_llama

    def kept(cfg, inter):
        model = build_llama("llama-tiny", 64, intermediate_size=inter, num_hidden_layers=3)
        spec = RunSpec.from_model(model, batch=2, seq=16)
        tech = build_technique("adapter", cfg)
        ctx = Context(model=model, spec=spec)
        tech.apply(ctx)
        meter = MemoryMeter(ctx.model)
        with meter.region():
            loss = ctx.model(**lm_batch()).loss
            out = meter.current().activations
            loss.backward()
        return out

    assert kept(METHODS[0], 176) == kept(METHODS[0], 704)


def test_anti_redundancy_weighs_a_repeated_layer_less():
    from memfit.adapters.sherl import EarlyRoute

    route = EarlyRoute(3, 8, 4, temperature=0.1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    r = route.redundancy([a, a.clone(), b])
    assert (r[0] > r[2]).all() and torch.allclose(r[0], r[1])


def test_bad_options_are_config_errors():
    model = tiny_llama(layers=2)
    with pytest.raises(ConfigError, match="late=2 leaves no early layer"):
        build_technique("adapter", {"name": "sherl", "late": 2}).check(
            Context(model=model, spec=RunSpec.from_model(model)))
    weights = build_technique("weights", "int8")
    for name in ("unipt", "sherl", "lst"):
        with pytest.raises(ConfigError, match="remove the 'weights' technique"):
            build_technique("adapter", name).check(
                Context(model=model, spec=RunSpec.from_model(model), techniques=[weights]))


def test_sherl_without_early_taps_is_a_compat_error():
    model, data, spec, tech, ctx = _setup({"name": "sherl"}, "causal_lm")
    tech.apply(ctx)
    tech._states = []  # as if the backbone stopped calling its early layers through the hooked modules
    with pytest.raises(CompatError, match=r"tapped 0 early layer outputs"):
        tech._inject(None, (torch.zeros(2, 16, 64),), {})
    with pytest.raises(CompatError, match="never reached"):
        tech.on_step_end(ctx, {})


@pytest.mark.parametrize("name", ["sherl", "meft"])
def test_training_a_tied_lm_head_is_refused(name):
    """SHERL's and MEFT's backbone forward keeps a graph: a trained tied head would train the embeddings below."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    tech = build_technique("adapter", {"name": name, "train_head": True})
    with pytest.raises(ConfigError, match="ties its LM head"):
        tech.check(Context(model=model, spec=RunSpec.from_model(model)))
    build_technique("adapter", name).check(Context(model=model, spec=RunSpec.from_model(model)))


def test_unipt_interaction_keeps_each_tokens_own_layer_state():
    # with a zero query every token attends uniformly: what tells tokens apart is then only each one's own x_l
    # (without it, token classification learned a sentence-level push to the majority tag: CoNLL F1 0.014)
    from memfit.adapters.unipt import ParallelSide

    torch.manual_seed(0)
    side = ParallelSide(n_layers=2, hidden=16, d=8)
    torch.nn.init.zeros_(side.query.weight)
    torch.nn.init.zeros_(side.query.bias)
    states = [torch.randn(1, 5, 16) for _ in range(3)]
    seen = []
    side.norm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    side(states, states[-1], None, causal=False)
    w = torch.softmax(side.layer_logits, 0)
    own = sum(w[i] * down(states[i + 1]) for i, down in enumerate(side.downs))
    merged = seen[0]
    torch.testing.assert_close(merged - merged[:, :1], own - own[:, :1])
