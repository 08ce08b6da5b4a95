"""Nothing a user owns is lost: memfit writes only into new, empty or its own run directories, removes only the
files it wrote, refuses before writing anything, and resumes past a corrupt checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from memfit.cli import app
from memfit.errors import CheckpointError, RunDirError
from memfit.recipe import load_recipe
from memfit.train import train

from .bad_inputs import _truncate
from .recipes import toy_recipe


def _cli(*argv: str):
    return CliRunner().invoke(app, list(argv))


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_quickstart_never_deletes_files_it_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = _cli("quickstart", "--steps", "1", "-o", str(mine))
    assert result.exit_code == 2 and "not a memfit run" in result.output, result.output
    assert "memfit quickstart" not in result.output  # refused before it announced a run
    assert _snapshot(mine) == {mine.joinpath("thesis.tex").relative_to(mine): b"years of work"}


def test_quickstart_replaces_only_its_own_files(tmp_path, data_dir):
    run = tmp_path / "qs"  # an earlier quickstart run (as memfit leaves it) plus a user's file inside it
    run.mkdir()
    (run / ".memfit-run").write_text('{"name": "quickstart"}')
    (run / "recipe.yaml").write_text("name: quickstart\n")
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0, "lr": 0.1}\n')
    (run / "notes.txt").write_text("mine")
    again = _cli("quickstart", "--steps", "1", "-o", str(run))
    assert again.exit_code == 0, again.output
    assert (run / "notes.txt").read_text() == "mine"
    assert sorted(_losses(run)) == [1]  # the new run's metrics only

    other = tmp_path / "pretrain"  # a run of another recipe is not the quickstart's to replace
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(toy_recipe("pretrain", data_dir, steps=1, measure_steps=0)))
    assert _cli("train", str(recipe), "-o", str(other)).exit_code == 0
    before = _snapshot(other)
    refused = _cli("quickstart", "--steps", "1", "-o", str(other))
    assert refused.exit_code == 2 and "'pretrain'" in refused.output, refused.output
    assert _snapshot(other) == before


def test_refused_rerun_changes_nothing(tmp_path, data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(toy_recipe("pretrain", data_dir, steps=2, measure_steps=0)))
    run = tmp_path / "run"
    assert _cli("train", str(recipe), "-o", str(run)).exit_code == 0
    before = _snapshot(run)
    changed = tmp_path / "r2.yaml"
    changed.write_text(yaml.safe_dump(toy_recipe("pretrain", data_dir, steps=3, measure_steps=0)))
    again = _cli("train", str(changed), "-o", str(run))
    assert again.exit_code == 2 and "--resume" in again.output and "--overwrite" in again.output
    assert _snapshot(run) == before  # recipe.yaml included


def test_rerun_without_checkpoint_refuses_then_overwrites_cleanly(tmp_path, data_dir):
    """A run that stopped before its first checkpoint: no new metrics are appended to the old ones."""
    recipe = load_recipe(toy_recipe("pretrain", data_dir, steps=3, measure_steps=0))
    run = tmp_path / "run"
    train(recipe, run, quiet=True)
    for name in ("checkpoints", "model"):
        import shutil

        shutil.rmtree(run / name)
    (run / "memory.json").unlink()
    (run / "mine.txt").write_text("keep me")
    old_metrics = (run / "metrics.jsonl").read_bytes()

    with pytest.raises(RunDirError, match="no checkpoint.*--overwrite"):
        train(recipe, run, quiet=True)
    assert (run / "metrics.jsonl").read_bytes() == old_metrics
    with pytest.raises(CheckpointError, match="--overwrite"):
        train(recipe, run, resume=True, quiet=True)

    train(recipe, run, overwrite=True, quiet=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(1) == 1  # one run's metrics, not two appended
    assert (run / "mine.txt").read_text() == "keep me"


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, data_dir):
    recipe = load_recipe(toy_recipe("pretrain", data_dir, steps=6, save_every=2, keep_checkpoints=3,
                                    measure_steps=0))
    full = tmp_path / "full"
    train(recipe, full, quiet=True)
    assert sorted(p.name for p in (full / "checkpoints").glob("step-*")) == \
        ["step-0000002", "step-0000004", "step-0000006"]  # keep_checkpoints=3

    # a run stopped after its step-4 checkpoint, whose step-4 files were then cut short
    part = tmp_path / "part"
    train(load_recipe(toy_recipe("pretrain", data_dir, steps=6, save_every=2, keep_checkpoints=3,
                                 measure_steps=0)), part, quiet=True)
    import shutil

    shutil.rmtree(part / "checkpoints" / "step-0000006")
    _truncate(part / "checkpoints" / "step-0000004" / "optimizer.safetensors")
    result = _cli("train", str(_recipe_file(tmp_path, recipe)), "--resume", "-o", str(part))
    assert result.exit_code == 0, result.output
    assert "step-0000004 is corrupt" in result.output and "resuming from step-0000002" in result.output
    assert (part / "checkpoints" / "corrupt-step-0000004").is_dir()  # set aside, not deleted
    a, b = _losses(full), _losses(part)
    assert [a[s] for s in (3, 4, 5, 6)] == [b[s] for s in (3, 4, 5, 6)]  # resumed exactly from step 2


def _recipe_file(tmp_path, recipe) -> str:
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return str(path)


def test_resume_and_overwrite_exclude_each_other(tmp_path, data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(toy_recipe("pretrain", data_dir)))
    result = _cli("train", str(recipe), "--resume", "--overwrite", "-o", str(tmp_path / "run"))
    assert result.exit_code == 2 and "one of them" in result.output
