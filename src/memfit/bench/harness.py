"""The bench harness: run a suite, collect rows, write `<out>/<suite>.json` and `<suite>.md`.

A suite is `memfit/bench/suites/<name>.py` with `run(opts: BenchOptions) -> list[dict]`. Rows are flat dicts;
`train_row` turns one training run into a row with quality, memory by category, tokens/s and MFU.
"""

from __future__ import annotations

import importlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memfit.bench.mfu import measure_matmul_peak, mfu, train_flops_per_token
from memfit.errors import ConfigError
from memfit.memory.breakdown import format_bytes
from memfit.progress import note

SHARED_DATA = Path("../shared/data")


@dataclass
class BenchOptions:
    quick: bool = False
    out_dir: Path = Path("bench-results")
    data_dir: Path = SHARED_DATA
    only: list[str] = field(default_factory=list)  # method names to run (empty: all)
    peak_flops: dict[str, float] = field(default_factory=dict)  # measured once per run, per dtype
    suite: str = ""  # set by `run_suite`; names the partial-results file
    precisions: list[str] = field(default_factory=list)  # train precisions to run (empty: each recipe's own)
    compile: bool = False  # also run rows with train.compile: true (suites that support it)

    def wants(self, method: str) -> bool:
        return not self.only or method in self.only

    def peak(self, precision: str = "fp32") -> float:
        if precision not in self.peak_flops:
            note(f"measuring this machine's {precision} matmul peak (for MFU)")
            from memfit.memory.precision import precision as policy_of

            dtype = policy_of(precision).compute_dtype
            self.peak_flops[precision] = measure_matmul_peak(dtype)
        return self.peak_flops[precision]


def suite_module(name: str):
    module_name = f"memfit.bench.suites.{name.replace('-', '_')}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ConfigError(f"unknown bench suite '{name}'; available: {', '.join(available_suites())}") from None


def available_suites() -> list[str]:
    folder = Path(__file__).parent / "suites"
    return sorted(p.stem.replace("_", "-") for p in folder.glob("*.py") if not p.stem.startswith("_"))


def train_row(recipe: dict[str, Any], method: str, opts: BenchOptions, workload: str = "", **extra) -> dict:
    """Train a recipe (dict) and return a flat row: quality, trainable params, memory by category, speed, MFU."""
    from memfit.recipe import load_recipe
    from memfit.train import train

    rec = load_recipe(recipe)
    note(f"[{opts.suite}] {workload or rec.name} / {method}: training {rec.train.steps} steps")
    t0 = time.perf_counter()
    result = train(rec, quiet=True)
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"workload": workload or rec.name, "method": method, **result.metrics,
                           "trainable_params": result.trainable_params, "steps": rec.train.steps,
                           "tokens_per_s": round(result.tokens_per_s, 1), "wall_s": round(wall, 1)}
    if result.memory is not None:
        for cat, nbytes in result.memory.peak.to_dict().items():
            row[f"peak_{cat}"] = nbytes
        row["process_peak"] = result.memory.process_peak
        row["max_gradients"] = result.memory.category_peaks.gradients  # each category's own maximum
        row["max_optimizer"] = result.memory.category_peaks.optimizer
    row["optimizer_state"] = result.optimizer_state_bytes
    row["estimate_optimizer"] = result.estimate.optimizer
    row["estimate_peak"] = result.estimate_peak
    n_params = result.total_params
    seq = recipe.get("data", {}).get("block_size") or recipe.get("data", {}).get("max_length", 128)
    shape = _shape(rec)
    backprop = rec.step == "backprop" or (isinstance(rec.step, dict) and rec.step.get("name") == "backprop")
    fpt = train_flops_per_token(n_params, shape[0], shape[1], seq, backward=backprop,
                                trainable_fraction=result.trainable_params / max(n_params, 1))
    row["mfu"] = round(mfu(result.tokens_per_s, fpt, opts.peak(rec.train.precision)), 4)
    row["matmul_tflops"] = round(opts.peak(rec.train.precision) / 1e12, 4)  # this run's matmul peak, its dtype
    if rec.train.compile:
        row["compile_s"] = round(result.extras.get("compile_s") or 0.0, 1)
    row.update(extra)
    record_partial(opts, row)
    return row


def record_all(opts: BenchOptions, rows: list[dict], new: list[dict]) -> None:
    """`rows += new`, each new row recorded as it is (`record_partial`) — for sections that return their rows."""
    for row in new:
        rows.append(row)
        record_partial(opts, row)


def record_partial(opts: BenchOptions, row: dict) -> None:
    """Append a finished row to `<out>/<suite>.partial.jsonl` and say so on stderr, so a long suite that is
    stopped keeps what it measured."""
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    with (opts.out_dir / f"{opts.suite or 'bench'}.partial.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    note(f"[{opts.suite}] {row.get('workload', '')} / {row.get('method', '')} done ({row.get('wall_s', '?')} s)")


def _shape(rec) -> tuple[int, int]:
    from memfit.models.presets import PRESETS

    if rec.model.preset:
        p = PRESETS[rec.model.preset]
        return p["num_hidden_layers"], p["hidden_size"]
    return 6, 384  # MiniLM-L6; only used for the small attention term


def write_results(suite: str, rows: list[dict], opts: BenchOptions, seconds: float) -> tuple[Path, Path]:
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"suite": suite, "quick": opts.quick, "seconds": round(seconds, 1), "torch": torch.__version__,
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in opts.peak_flops.items()}}
    json_path = opts.out_dir / f"{suite}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md_path = opts.out_dir / f"{suite}.md"
    md_path.write_text(markdown_table(rows) + f"\n\n{json.dumps(meta)}\n")
    return json_path, md_path


_BYTE_KEYS = ("optimizer_state", "process_peak", "estimate_peak", "estimate_optimizer", "max_gradients",
              "max_optimizer", "model_state", "predicted_model_state", "tensor_peak", "offloaded", "predicted_fall",
              "process_peak_fall")


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and "_vs_" not in key and (key.startswith("peak_") or key in _BYTE_KEYS):
        return format_bytes(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and not (k.startswith("peak_") and not any(r.get(k) for r in rows))]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(k, row.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def run_suite(name: str, opts: BenchOptions) -> tuple[list[dict], Path, Path]:
    module = suite_module(name)
    opts.suite = name
    (opts.out_dir / f"{name}.partial.jsonl").unlink(missing_ok=True)
    note(f"bench {name}{' (quick)' if opts.quick else ''}: rows are reported as they finish, in "
         f"{opts.out_dir / (name + '.partial.jsonl')}")
    t0 = time.perf_counter()
    rows = module.run(opts)
    json_path, md_path = write_results(name, rows, opts, time.perf_counter() - t0)
    return rows, json_path, md_path
