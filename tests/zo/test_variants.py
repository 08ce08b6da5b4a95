"""Variant behaviour: trainable subsets (LoRA), block-wise cycling, sign steps, exact resume, accuracy objective,
and a run through the training loop."""

from __future__ import annotations

import copy

import pytest
import torch

from memfit.zo.objectives import accuracy, objective_fn
from memfit.zo.spsa import block_groups
from memfit.zo.zo_adam import ZOAdam
from memfit.zo.zo_block import ZOBlockSGD
from memfit.zo.zo_sign import ZOSignSGD

from .helpers import lm_batch, snapshot, technique_and_step, tiny_model


def test_zo_on_lora_parameters_leaves_the_base_untouched():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = lm_batch()
    _, _, step = technique_and_step("mezo", model, batch, lr=1e-2)
    before = snapshot(model)
    step([batch])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at zero and moves


def test_block_wise_updates_one_block_per_step_and_cycles():
    model, batch = tiny_model(), lm_batch()
    groups = block_groups(model)
    assert [g["block"] for g in groups][:3] == ["embed_tokens", "model.layers.0", "model.layers.1"]
    opt = ZOBlockSGD(groups, lr=1e-2, blocks_per_step=1)
    for expected in (0, 1):
        before = snapshot(model)
        opt.step(lambda: model(**batch).loss)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        names = set(groups[expected]["names"])
        assert changed and changed <= names, (expected, changed)


def test_sign_step_moves_every_element_by_lr():
    model, batch = tiny_model(), lm_batch()
    params = list(model.parameters())
    lr = 1e-3
    opt = ZOSignSGD(params, lr=lr)
    before = [p.detach().clone() for p in params]
    opt.step(lambda: model(**batch).loss)
    for p, b in zip(params, before):
        torch.testing.assert_close((p - b).abs(), torch.full_like(p, lr), rtol=1e-4, atol=0)


def test_optimizer_state_dict_resumes_exactly():
    batch = lm_batch()
    model = tiny_model()
    opt = ZOAdam(list(model.parameters()), lr=1e-3, seed=4)
    closure = lambda: model(**batch).loss
    opt.step(closure)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(2):
        opt.step(closure)
    straight = snapshot(model)

    model2 = tiny_model(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = ZOAdam(list(model2.parameters()), lr=1e-3, seed=99)
    opt2.load_state_dict(saved_opt)  # the seed, step counters and moments come back
    for _ in range(2):
        opt2.step(lambda: model2(**batch).loss)
    for n, p in model2.named_parameters():
        assert torch.equal(p, straight[n]), n


def test_accuracy_objective_is_minus_accuracy():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = model

        def forward(self, x):
            return type("Out", (), {"logits": self.lin(x)})()

    w = Wrapper()
    x = torch.randn(10, 4)
    labels = w(x).logits.argmax(-1)
    labels[:3] = (labels[:3] + 1) % 3
    batch = {"x": x, "labels": labels}
    assert float(accuracy(w, batch)) == pytest.approx(0.7)
    assert float(objective_fn("accuracy", "seq_cls")(w, batch)) == pytest.approx(-0.7)


def test_mezo_trains_a_classifier_on_accuracy_alone():
    """Non-differentiable objective: the step sees only accuracy values, and accuracy does not get worse."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    labels = (x[:, 0] + x[:, 1] > 0).long()

    class Clf(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 2)

        def forward(self, x):
            return type("Out", (), {"logits": self.lin(x)})()

    model = Clf()
    batch = {"x": x, "labels": labels}
    from memfit.zo.mezo import ZOSGD

    opt = ZOSGD(list(model.parameters()), lr=0.5, eps=0.1, seed=0)
    objective = objective_fn("accuracy", "seq_cls")
    start = float(accuracy(model, batch))
    for _ in range(60):
        opt.step(lambda: objective(model, batch))
    assert all(p.grad is None for p in model.parameters())
    assert float(accuracy(model, batch)) > max(start, 0.8)


def test_training_loop_runs_a_zo_recipe(data_dir, tmp_path):
    from memfit.recipe import load_recipe
    from memfit.train import train

    recipe = {
        "name": "zo-toy", "task": "causal_lm", "model": {"preset": "llama-tiny"},
        "data": {"kind": "text", "paths": [str(data_dir / "tinyshakespeare" / "input.txt")], "block_size": 16,
                 "vocab_size": 300, "max_chars": 20000},
        "train": {"steps": 3, "batch_size": 2, "schedule": "constant", "log_every": 1, "measure_steps": 1,
                  "eval_batches": 1},
        "step": {"name": "zo-momentum", "lr": 1e-4, "eps": 1e-3},
    }
    result = train(load_recipe(recipe), run_dir=tmp_path / "run", quiet=True)
    assert len(result.history) == 3
    assert result.memory.category_peaks.gradients == 0
    state = 4 * result.trainable_params  # one fp32 momentum buffer per parameter
    assert state <= result.memory.category_peaks.optimizer <= state + 4 * 2**14  # + the update's chunk
