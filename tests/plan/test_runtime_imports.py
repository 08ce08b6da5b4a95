"""The runtime category measures the libraries of a fresh interpreter that imports what a training run imports
(`memory.runtime.PROBE_IMPORTS`): a real `memfit train` must have loaded nothing more by the time its step peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from memfit.memory.runtime import PROBE_IMPORTS

from train.recipes import toy_recipe

SRC = Path(__file__).resolve().parents[2] / "src"
TOP = "import json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"


def _packages(code: str, cwd: Path) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_probe_imports_what_a_training_run_has_loaded_at_its_peak(tmp_path, data_dir):
    recipe = toy_recipe("pretrain", data_dir)
    recipe["model"] = {"preset": "llama-tiny"}
    recipe["data"].update({"block_size": 32, "vocab_size": 512})
    recipe["train"].update({"steps": 2, "batch_size": 2, "device": "cpu", "eval_every": 0, "eval_batches": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    # the packages loaded when the meter reads the process peak (the last measured step), through the CLI
    run = ("import json, sys\nimport memfit.memory.measure as m\nseen = []\n_report = m.MemoryMeter.report\n"
           "def report(self, *a, **k):\n    seen.append(sorted({n.split('.')[0] for n in sys.modules}))\n"
           "    return _report(self, *a, **k)\n"
           "m.MemoryMeter.report = report\n"
           f"sys.argv = ['memfit', 'train', 'r.yaml', '-o', 'run']\n"
           "from memfit.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
           "print(json.dumps(seen[0]))\n")
    at_peak = _packages(run, tmp_path)
    probe = _packages(PROBE_IMPORTS + TOP, tmp_path)
    assert {"transformers", "typer", "rich", "tokenizers"} <= probe
    third_party = at_peak - probe - set(sys.stdlib_module_names)  # stdlib modules (html, ...) weigh nothing
    assert third_party == set(), "a training run imports libraries the runtime probe does not measure"
