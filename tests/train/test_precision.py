"""Precision as Lightning names it (`memory/precision.py`): names, storage dtypes built = estimated, model.dtype,
16-mixed's loss scaler resumed exactly."""

from __future__ import annotations

import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_step
from memfit.memory.precision import PRECISIONS, precision
from memfit.recipe import load_recipe
from memfit.train.build import build_run

from .recipes import resumed_losses_match, toy_recipe


@pytest.mark.parametrize("old,new", [("fp32", "32-true"), ("bf16", "bf16-mixed"), ("fp16", "16-mixed"),
                                     ("32", "32-true"), ("16", "16-mixed"), ("bf16-true", "bf16-true")])
def test_old_names_map_to_lightning_names(old, new, data_dir):
    assert precision(old).name == new
    assert load_recipe(toy_recipe("pretrain", data_dir, precision=old)).train.precision == new


def test_unknown_precision_names_the_choices(data_dir):
    with pytest.raises(ConfigError) as err:
        load_recipe(toy_recipe("pretrain", data_dir, precision="half"))
    assert all(name in str(err.value) for name in PRECISIONS)


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_built_weights_and_gradients_are_stored_as_estimated(name, data_dir):
    built = build_run(load_recipe(toy_recipe("pretrain", data_dir, precision=name)))
    policy = precision(name)
    assert {p.dtype for p in built.model.parameters()} == {policy.storage_dtype}
    assert built.spec.policy == policy and (built.ctx.grad_scaler is not None) == policy.loss_scaling
    est, _ = estimate_step(built.spec, built.techniques)
    batch = next(iter(torch.utils.data.DataLoader(built.data.train, batch_size=2, collate_fn=built.data.collate)))
    built.forward_backward(built.model, batch, 1.0)
    assert est.parameters == sum(p.numel() * p.element_size() for p in built.model.parameters())
    assert est.gradients == sum(p.grad.numel() * p.grad.element_size() for p in built.model.parameters())
    assert {p.grad.dtype for p in built.model.parameters()} == {policy.storage_dtype}


def test_model_dtype_that_would_train_in_another_dtype_is_refused(data_dir):
    with pytest.raises(ConfigError, match="bf16-true"):
        load_recipe(toy_recipe("pretrain", data_dir, precision="bf16-mixed") | {"model": {"preset": "llama-tiny",
                                                                                         "dtype": "bf16"}})


def test_lora_base_keeps_its_dtype_and_adapters_take_the_storage_dtype(data_dir):
    recipe = toy_recipe("pretrain", data_dir, precision="bf16-mixed")
    recipe["model"]["dtype"] = "bf16"
    recipe["adapter"] = {"name": "lora", "r": 4}
    built = build_run(load_recipe(recipe))
    frozen = {p.dtype for p in built.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in built.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    est, _ = estimate_step(built.spec, built.techniques)
    assert est.parameters == sum(p.numel() * p.element_size() for p in built.model.parameters())


def test_16_mixed_resumes_its_loss_scale_exactly(data_dir, tmp_path):
    recipe = load_recipe(toy_recipe("pretrain", data_dir, steps=6, save_every=3, measure_steps=0, eval_every=0,
                                    precision="16-mixed"))
    from memfit.train.checkpoint import load_state

    assert resumed_losses_match(recipe, tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    saved = load_state(full / "checkpoints" / "step-0000003", "loop")["techniques"]["amp.grad_scaler"]
    assert saved["scale"] > 0 and "_growth_tracker" in saved
    end_a = load_state(full / "checkpoints" / "step-0000006", "loop")["techniques"]["amp.grad_scaler"]
    end_b = load_state(part / "checkpoints" / "step-0000006", "loop")["techniques"]["amp.grad_scaler"]
    assert end_a == end_b


def test_16_mixed_refuses_updates_inside_backward(data_dir):
    recipe = toy_recipe("pretrain", data_dir, precision="16-mixed")
    recipe["optimizer"] = {"name": "adamw", "layerwise": True}
    with pytest.raises(ConfigError, match="16-mixed"):
        build_run(load_recipe(recipe))


def test_layer_samplers_train_the_base_so_model_dtype_must_match(data_dir):
    recipe = toy_recipe("pretrain", data_dir, precision="bf16-mixed")
    recipe["model"]["dtype"] = "bf16"
    recipe["adapter"] = {"name": "lisa", "layers": 1}
    with pytest.raises(ConfigError, match="model.dtype"):
        load_recipe(recipe)
