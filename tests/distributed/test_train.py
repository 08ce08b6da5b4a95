"""`memfit train RECIPE --nproc 2` end to end on a tiny recipe: the normal run path sharded with FSDP2 — losses
equal one process's on the same global batch (with gradient accumulation), a rank-0 run directory with every rank's
peak and an exported model, exact resume from a DCP checkpoint, and resume on another number of ranks (2 -> 1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from memfit.distributed.runtime import DistContext
from memfit.errors import CheckpointError, ConfigError
from memfit.recipe import load_recipe
from memfit.train import train
from memfit.train.parallel import Parallel, check
from tests.train.recipes import toy_recipe

pytestmark = pytest.mark.timeout(600)
PARITY = 1e-5


def _recipe(data_dir) -> dict:
    return toy_recipe("pretrain", data_dir, steps=6, save_every=3, grad_accum=2, eval_every=0, measure_steps=2)


def _memfit(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "memfit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def shared_data():
    from tests.conftest import DATA

    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    """A 2-rank run (checkpoints at steps 3 and 6), then its step-3 checkpoint resumed on 2 and on 1 rank."""
    data_dir = shared_data
    root = tmp_path_factory.mktemp("train-nproc")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(data_dir)))
    out = {"recipe": recipe, "two": root / "two"}
    out["stdout"] = _wait(_memfit("train", str(recipe), "-o", str(out["two"]), "--nproc", "2"))
    resumes = []
    for name, nproc in (("resumed", "2"), ("resumed_on_one", "1")):  # side by side: mostly start-up time
        out[name] = root / name
        shutil.copytree(out["two"], out[name])
        shutil.rmtree(out[name] / "checkpoints" / "step-0000006")
        resumes.append(_memfit("train", str(recipe), "-o", str(out[name]), "--resume", "--nproc", nproc))
    for process in resumes:
        _wait(process)
    return out


def test_losses_match_one_process(runs, data_dir, tmp_path):
    one = train(load_recipe(_recipe(data_dir)), tmp_path / "one", quiet=True)
    assert one.history
    single, sharded = _losses(tmp_path / "one"), _losses(runs["two"])
    assert single.keys() == sharded.keys() == set(range(1, 7))
    assert max(abs(single[s] - sharded[s]) for s in single) <= PARITY, (single, sharded)


def test_rank0_writes_the_run_dir_with_every_ranks_peak(runs):
    run = runs["two"]
    for f in ("recipe.yaml", "metrics.jsonl", "memory.json", "report.html", "checkpoints/latest"):
        assert (run / f).exists(), f
    summary = json.loads((run / "memory.json").read_text())
    ranks = summary["measured"]["notes"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    params = 4 * summary["total_params"]  # one process's parameters, fp32
    assert summary["estimate"]["parameters"] == ranks[0]["held"]["sharded_params"]  # the per-rank estimate
    for r in ranks:  # each rank holds about half the parameters between steps (padded shards)
        assert 0.5 * params <= r["held"]["sharded_params"] <= 0.55 * params, (r["held"], params)
        assert r["tensor_peak"] > r["model_state_peak"] > 0
    assert "rank 1: tensor peak" in runs["stdout"]
    # memory.sharding.estimate_rank: each rank's measured tensor peak (the second step: optimizer state alive)
    for r in ranks:
        assert 0.95 <= r["tensor_peak"] / summary["estimate_peak"] <= 1.05, (r["tensor_peak"], summary["estimate_peak"])
    assert (run / "checkpoints" / "step-0000006" / "memfit.json").exists()  # a DCP checkpoint


def test_exported_model_holds_the_full_weights(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["two"] / "model")
    summary = json.loads((runs["two"] / "memory.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == summary["total_params"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_is_exact(runs):
    a, b = _losses(runs["two"]), _losses(runs["resumed"])
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bit-identical


def test_resume_on_another_number_of_ranks(runs):
    a, b = _losses(runs["two"]), _losses(runs["resumed_on_one"])
    assert max(abs(a[s] - b[s]) for s in (4, 5, 6)) <= PARITY


def test_single_process_resume_of_a_distributed_run_is_refused(runs, data_dir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(runs["two"], run)
    with pytest.raises(CheckpointError, match="--nproc"):
        train(load_recipe(_recipe(data_dir)), run, resume=True, quiet=True)
    assert (run / "checkpoints" / "step-0000006").is_dir()  # not set aside as corrupt


def test_global_batch_must_split_over_ranks(data_dir):
    par = Parallel(DistContext(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), backend="gloo",
                               mesh=None))
    with pytest.raises(ConfigError, match="multiple of 3"):
        check(load_recipe(_recipe(data_dir)), par)


def test_cpu_offload_is_refused_off_gpu(data_dir):
    """FSDP2's CPUOffloadPolicy moves a GPU run's shards to the host; on a CPU run it is one clear error."""
    recipe = load_recipe({**_recipe(data_dir), "distributed": {"offload": "cpu"}})
    par = Parallel(DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo",
                               mesh=None))
    with pytest.raises(ConfigError, match="offload: cpu"):
        check(recipe, par)
