"""Process-level accuracy of the estimate (issue 18 item 1): each configuration trains two steps in a *fresh*
process, whose lifetime RSS high-water mark is compared with the prediction made in this process — the step's
tensor peak (`estimate_step`, model on the meta device) plus the `runtime` category (`memory/runtime.py`).

`memfit bench memory-model --only process` (30 configurations: 3 Llama sizes × 2 batch/sequence shapes × 5
plans; `--quick`: 10 at a third shape, 2×128, held out from the fit of `memory/runtime.py`'s constants).
Each child: `python -m memfit.bench.process_grid '<recipe json>'` prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20

PRESETS = ("llama-1m", "llama-20m", "llama-60m")
SHAPES = ((1, 64), (4, 256))  # (batch, sequence)
QUICK_SHAPES = ((2, 128),)  # `--quick`: a shape the constants were not fitted on
PLANS: dict[str, dict] = {
    "adamw": {},
    "adamw+checkpointing": {"activations": ["checkpointing"]},
    "adamw layer-wise": {"optimizer": {"name": "adamw", "layerwise": True}},
    "lora r=8": {"adapter": {"name": "lora", "r": 8}},
    "galore": {"optimizer": {"name": "galore", "rank": 32}},
}
VOCAB = 2048


def grid(quick: bool) -> list[tuple[str, int, int, str]]:
    presets = PRESETS[:2] if quick else PRESETS
    return [(p, b, s, plan) for p, (b, s), plan in itertools.product(presets, QUICK_SHAPES if quick else SHAPES,
                                                                      PLANS)]


def recipe(preset: str, batch: int, seq: int, plan: str, data_dir: Path, out_dir: Path) -> dict:
    return {"name": f"grid-{preset}-{batch}x{seq}-{plan.replace(' ', '_')}", "task": "causal_lm",
            "output_dir": str(out_dir), "model": {"preset": preset},
            "data": {"kind": "text", "paths": [str(data_dir / "tinyshakespeare" / "input.txt")], "block_size": seq,
                     "vocab_size": VOCAB, "val_fraction": 0.05},
            "train": {"steps": 2, "batch_size": batch, "measure_steps": 1, "eval_every": 0, "eval_batches": 1,
                      "log_every": 1, "warmup_steps": 0, "device": "cpu"},
            "optimizer": "adamw", **PLANS[plan]}


def predict(rec: dict):
    """(breakdown with runtime, tensor step peak, process peak) predicted on the meta device, in this process."""
    from memfit.plan.meta import estimate_recipe

    breakdown, tensors = estimate_recipe(rec)
    return breakdown, tensors, tensors + breakdown.runtime


def measure(rec: dict, timeout: int = 300) -> dict:
    """Train `rec` in a fresh interpreter; its lifetime RSS peak, tensor peak, and the runtime it measured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-m", "memfit.bench.process_grid", json.dumps(rec)], capture_output=True,
                         text=True, env=env, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"grid row {rec['name']} failed: {out.stderr.strip()[-400:]}")
    return json.loads(lines[-1])


def rows(opts) -> list[dict]:
    from memfit.bench.harness import record_partial

    data_dir = Path(opts.data_dir)
    out_dir = Path(opts.out_dir) / "process-grid-runs"
    result = []
    for preset, batch, seq, plan in grid(opts.quick):
        rec = recipe(preset, batch, seq, plan, data_dir, out_dir)
        breakdown, tensors, process = predict(rec)
        t0 = time.perf_counter()
        got = measure(rec)
        result.append({"model": preset, "batch": batch, "seq": seq, "plan": plan,
                       "tensor_pred_mib": round(tensors / MiB, 1), "tensor_meas_mib": round(got["tensor"] / MiB, 1),
                       "process_pred_mib": round(process / MiB, 1), "process_meas_mib": round(got["hwm"] / MiB, 1),
                       "process_ratio": round(process / got["hwm"], 3),
                       "runtime_pred_mib": round(breakdown.runtime / MiB, 1),
                       "runtime_meas_mib": round((got["hwm"] - got["tensor"]) / MiB, 1),
                       "wall_s": round(time.perf_counter() - t0, 1)})
        record_partial(opts, {**result[-1], "workload": f"{preset} {batch}x{seq}", "method": plan})
    return result


def summary(grid_rows: list[dict]) -> dict:
    """Median |pred/meas − 1|, the worst under- and over-prediction."""
    ratios = [r["process_ratio"] for r in grid_rows]
    return {"n": len(ratios), "median_abs_error": round(statistics.median(abs(x - 1) for x in ratios), 4),
            "worst_under": round(min(ratios) - 1, 4), "worst_over": round(max(ratios) - 1, 4)}


def _child(rec_json: str) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    from memfit.recipe import load_recipe
    from memfit.train import train

    result = train(load_recipe(json.loads(rec_json)), quiet=True)
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"hwm": hwm, "tensor": result.memory.tensor_peak, "region": result.memory.process_peak}))


if __name__ == "__main__":
    _child(sys.argv[1])
