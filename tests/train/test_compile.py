"""`train.compile: true`: decoder blocks compiled in place train like eager; refused combinations give one error."""

from __future__ import annotations

import pytest
from memfit.activations._common import decoder_layers
from memfit.errors import ConfigError
from memfit.recipe import load_recipe
from memfit.train import train
from memfit.train.build import build_run
from memfit.train.compile import COMPILE_NOTE

from .recipes import toy_recipe


def _losses(data_dir, **train_cfg):
    # step 1 is measured (eager under the tracker); steps 2-3 run the compiled blocks
    recipe = load_recipe(toy_recipe("pretrain", data_dir, steps=3, measure_steps=1, eval_every=0, **train_cfg))
    result = train(recipe, quiet=True)
    return [h["loss"] for h in result.history], result


def test_compiled_blocks_train_like_eager(data_dir):
    from torch._dynamo.utils import counters

    counters.clear()
    eager, _ = _losses(data_dir)
    compiled, result = _losses(data_dir, compile=True)  # the default backend, inductor
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks really were compiled (not skipped)
    assert compiled == pytest.approx(eager, abs=1e-4)
    assert result.memory.notes["compile"] == COMPILE_NOTE
    assert result.extras["compile_s"] > 0


def test_blocks_compile_in_place_keeping_names(data_dir):
    built = build_run(load_recipe(toy_recipe("pretrain", data_dir, compile=True, compile_backend="eager")))
    assert all(block._compiled_call_impl is not None for block in decoder_layers(built.model))
    assert not any("_orig_mod" in name for name in built.model.state_dict())


def test_compile_with_distributed_is_one_line_error(data_dir):
    recipe = toy_recipe("pretrain", data_dir, compile=True)
    recipe["distributed"] = {"nproc": 2}
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert "train.compile" in str(err.value) and "distributed" in str(err.value) and "\n" not in str(err.value)
