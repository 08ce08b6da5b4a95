"""The run loop end to end: each shipped recipe at toy size, exact resume, gradient accumulation, schedules."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from memfit.recipe import load_recipe
from memfit.train import train
from memfit.train.schedule import lr_multiplier

from .recipes import toy_recipe


@pytest.mark.parametrize("name,metric", [("pretrain", "perplexity"), ("finetune-cls", "accuracy"),
                                         ("finetune-ner", "entity_f1")])
def test_recipe_runs_and_writes_run_dir(name, metric, data_dir, tmp_path):
    result = train(load_recipe(toy_recipe(name, data_dir)), tmp_path / "run", quiet=True)
    assert metric in result.metrics
    assert result.memory is not None and result.memory.peak.parameters > 0
    for f in ("recipe.yaml", "metrics.jsonl", "memory.json", "report.html", "loss.png", "memory.png"):
        assert (tmp_path / "run" / f).exists(), f
    summary = json.loads((tmp_path / "run" / "memory.json").read_text())
    assert summary["estimate"]["parameters"] == result.memory.peak.parameters


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_resume_gives_identical_losses(data_dir, tmp_path):
    recipe = load_recipe(toy_recipe("pretrain", data_dir, steps=6, save_every=3, measure_steps=0))
    full = tmp_path / "full"
    train(recipe, full, quiet=True)
    # simulate a run stopped right after its step-3 checkpoint
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-0000006")
    (part / "checkpoints" / "latest").write_text("step-0000003")
    train(recipe, part, resume=True, quiet=True)
    a, b = _losses(full), _losses(part)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bit-identical, not approximately


def test_grad_accumulation_matches_large_batch(data_dir):
    """Two micro-batches of 2 accumulate exactly the gradient of one batch of 4 (mean loss, not sum)."""
    from memfit.train.build import build_run
    from memfit.train.data_order import BatchStream

    base = toy_recipe("pretrain", data_dir, steps=1, measure_steps=0, clip_grad_norm=None)
    grads = []
    for accum in (1, 2):
        built = build_run(load_recipe(base))
        big = BatchStream(built.data.train, 4, built.data.collate, seed=0).shuffled(0)
        micro = [{k: v[i * 2:(i + 1) * 2] for k, v in big.items()} for i in range(accum)] if accum == 2 else [big]
        for batch in micro:
            built.forward_backward(built.model, batch, 1.0 / len(micro))
        grads.append(torch.cat([p.grad.flatten() for p in built.model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_schedules_shape():
    cos = lr_multiplier("cosine", 100, 10, min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(99) == pytest.approx(0.1, abs=1e-3)
    wsd = lr_multiplier("wsd", 100, 10, min_ratio=0.0, decay_fraction=0.2)
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(90) == pytest.approx(0.5)
