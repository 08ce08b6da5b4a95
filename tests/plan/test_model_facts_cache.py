"""`memfit plan` reads the model's facts (`ModelFacts`) off a meta model once per model description and from a cache
after that: the cached facts must give exactly the estimates the meta model gives, and a warm plan must not load
transformers' modeling code (most of the command's time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.bench.suites.memory_model import ARCHITECTURES, TINY
from memfit.memory.estimate import estimate_step
from memfit.memory.runtime import _cache_file
from memfit.plan.meta import meta_facts, meta_model, spec_for
from memfit.plan.target import recipe_for
from memfit.recipe import load_recipe
from memfit.techniques.registry import build_technique
from memfit.train.build import model_facts, run_spec

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def facts_cache(tmp_path, monkeypatch):
    """A fresh facts cache (the runtime measurement stays the suite's)."""
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path))
    return tmp_path / "facts"


def _config_json(tmp_path, name: str) -> Path:
    model_type, _, fields = ARCHITECTURES[name]
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"model_type": model_type, **TINY, **fields}))
    return path


@pytest.mark.parametrize("name,task", [("llama", "finetune-causal"), ("gemma2", "finetune-causal"),
                                       ("gpt2", "pretrain-causal"), ("qwen3-moe", "finetune-causal"),
                                       ("bert", "finetune-cls"), ("deberta-v3", "finetune-ner")])
def test_cached_facts_give_the_meta_models_estimates(tmp_path, facts_cache, name, task):
    raw, _ = recipe_for(str(_config_json(tmp_path, name)), task, seq=64, batch=2, device="cpu")
    recipe = load_recipe(raw)
    model = meta_model(recipe)
    cold = meta_facts(recipe)  # reads the meta model, writes the cache
    assert len(list(facts_cache.glob("*.pickle"))) == 1
    warm = meta_facts(recipe)  # from the cache
    assert warm is not cold and warm == cold == model_facts(model)
    parts = [build_technique("optimizer", {"name": "adamw"}), build_technique("activations", {"name": "checkpointing"})]
    for precision in ("32-true", "bf16-mixed"):
        spec = spec_for(recipe, warm, precision)
        assert spec == spec_for(recipe, model, precision)
        assert estimate_step(spec, parts) == estimate_step(spec_for(recipe, model, precision), parts)
    assert run_spec(recipe, model) == run_spec(recipe, warm)


def test_cache_key_follows_the_model(tmp_path, facts_cache):
    path = _config_json(tmp_path, "llama")
    raw, _ = recipe_for(str(path), "finetune-causal", seq=64, device="cpu")
    first = meta_facts(load_recipe(raw))
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_hidden_layers": 3}))
    second = meta_facts(load_recipe(raw))
    assert (first.shape.n_layers, second.shape.n_layers) == (2, 3)
    assert len(list(facts_cache.glob("*.pickle"))) == 2


def test_warm_plan_skips_transformers_modeling(tmp_path):
    """A second `memfit plan` for the same model: identical rows, and transformers' modeling code never loads."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if _cache_file().is_file():  # the library measurement is not what this test is about
        shutil.copy(_cache_file(), cache / _cache_file().name)
    raw, _ = recipe_for(str(_config_json(tmp_path, "llama")), "finetune-causal", seq=64, device="cpu")
    (tmp_path / "r.json").write_text(json.dumps(raw))
    code = ("import json, sys\nfrom memfit.plan import plan\n"
            f"r = plan(json.load(open({str(tmp_path / 'r.json')!r})), budget=2**40, pretrained=True)\n"
            "print(json.dumps({'rows': [[x.label, x.peak, x.process_peak] for x in r.rows],"
            " 'modeling': 'transformers.modeling_utils' in sys.modules}))")
    env = {**os.environ, "MEMFIT_CACHE": str(cache), "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True, timeout=600).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert runs[0]["modeling"] and not runs[1]["modeling"]
    assert runs[0]["rows"] == runs[1]["rows"] and len(runs[0]["rows"]) > 10
