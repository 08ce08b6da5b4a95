"""SwitchLoRA: a switch leaves the output unchanged; the switched vector's optimizer state is reset and its
counterpart frozen; the base weight gathers updates of rank above r; memory equals LoRA's, as estimated."""

import pytest
import torch

from memfit.adapters.switchlora import SwitchLoRALinear
from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter, state_bytes
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .tiny import cls_batch, lm_batch, tiny_bert, tiny_llama


def _switchlora(model, task="causal_lm", **opts):
    spec = RunSpec.from_model(model, task=task, batch=2, seq=16)
    tech = build_technique("adapter", {"name": "switchlora", "r": 4, **opts})
    ctx = Context(model=model, spec=spec)
    tech.check(ctx)
    tech.apply(ctx)
    return tech, ctx, spec


def test_a_switch_leaves_the_output_unchanged():
    torch.manual_seed(0)
    layer = SwitchLoRALinear(torch.nn.Linear(12, 10).double(), 3, 6.0, 4, torch.Generator().manual_seed(0))
    layer.double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    before = layer(x)
    layer.switch_B(1, 2)
    layer.switch_A(0, 3)
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)


def _train(tech, ctx, steps, data):
    ctx.optimizer = torch.optim.AdamW([p for p in ctx.model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ctx.step = step
        tech.on_step_start(ctx)
        ctx.optimizer.zero_grad()
        ctx.model(**data).loss.backward()
        ctx.optimizer.step()
        tech.on_step_end(ctx, {})


def test_optimizer_state_reset_and_counterpart_frozen():
    model = tiny_llama()
    tech, ctx, _ = _switchlora(model, switch_rate=1.0, freeze_steps=1, target=["q_proj"])
    _train(tech, ctx, 1, lm_batch())  # step 0: every vector switches
    layer = tech.layers[0]
    for p in (layer.lora_A, layer.lora_B):
        state = ctx.optimizer.state[p]
        assert state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0
    assert {(side, i) for (li, side, i) in tech.frozen if li == 0} == {(s, i) for s in "AB" for i in range(4)}
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    tech.config = tech.config.model_copy(update={"switch_rate": 0.0})
    ctx.step = 1
    tech.on_step_start(ctx)
    ctx.optimizer.zero_grad()
    ctx.model(**lm_batch()).loss.backward()
    ctx.optimizer.step()
    tech.on_step_end(ctx, {})
    torch.testing.assert_close(layer.lora_A, a, rtol=0, atol=0)  # frozen for this step: put back
    torch.testing.assert_close(layer.lora_B, b, rtol=0, atol=0)
    ctx.step = 3
    tech.on_step_start(ctx)
    assert not tech.frozen  # the freeze has run out


def test_base_weight_gathers_more_than_rank_r():
    model = tiny_llama()
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    tech, ctx, _ = _switchlora(model, switch_rate=0.5, freeze_steps=0, target=["q_proj"])
    _train(tech, ctx, 12, lm_batch())
    layer = tech.layers[0]
    delta = layer.weight.detach() + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach() - w0
    assert torch.linalg.matrix_rank(delta).item() > 4 and tech.switches > 0


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_memory_equals_lora_and_estimate(task):
    def run(cfg):
        model = tiny_llama() if task == "causal_lm" else tiny_bert(task)
        data = lm_batch() if task == "causal_lm" else cls_batch(task, seq=16)
        spec = RunSpec.from_model(model, task=task, batch=2, seq=16)
        tech = build_technique("adapter", cfg)
        ctx = Context(model=model, spec=spec)
        tech.apply(ctx)
        opt = torch.optim.AdamW([p for p in ctx.model.parameters() if p.requires_grad])
        meter = MemoryMeter(ctx.model)
        with meter.region():
            loss = ctx.model(**data).loss
            kept = meter.current().activations
            loss.backward()
        opt.step()
        est = estimate_run(spec, [tech, build_technique("optimizer", "adamw")])
        grads = sum(p.grad.nbytes for p in ctx.model.parameters() if p.grad is not None)
        return kept, grads, meter.report().peak, state_bytes(opt), est

    kept, grads, peak, opt_bytes, est = run({"name": "switchlora", "r": 4})
    lora_kept, lora_grads, _, lora_opt, lora_est = run({"name": "lora", "r": 4})
    assert kept == lora_kept and grads == lora_grads and opt_bytes == lora_opt  # LoRA's memory
    assert (peak.parameters, peak.buffers, grads, opt_bytes) == (est.parameters, est.buffers, est.gradients,
                                                                est.optimizer)
    assert est.activations == lora_est.activations >= kept  # LoRA's activation formula, an upper bound
    assert est.buffers - lora_est.buffers > 0  # the candidate pool


def test_bad_combinations_are_config_errors():
    model = tiny_llama()
    spec = RunSpec.from_model(model)
    tech = build_technique("adapter", {"name": "switchlora", "r": 4})
    with pytest.raises(ConfigError, match="remove the 'weights'"):
        tech.check(Context(model=model, spec=spec, techniques=[build_technique("weights", "int8")]))
    with pytest.raises(ConfigError, match="zeroth-order"):
        tech.check(Context(model=model, spec=spec, techniques=[build_technique("step", "mezo")]))
    with pytest.raises(ConfigError, match="r=4096 exceeds"):
        build_technique("adapter", {"name": "switchlora", "r": 4096}).check(Context(model=model, spec=spec))
