"""The `memfit` command line (typer + rich): train, estimate, plan, quickstart, report, bench (and `generate`, in
`memfit.cli.generate`). Shared set-up and error handling live in `memfit.cli.app`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memfit.cli.app import app, console, handles_errors


@app.command()
@handles_errors
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides, e.g. train.steps=50"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run directory (default runs/<name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its newest intact "
                                "checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --output (removes only the files "
                                   "memfit wrote there)."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Train on N processes of this machine with "
                                        "FSDP2 (torchrun; gloo on CPU, NCCL on CUDA); default: distributed.nproc. "
                                        "Under torchrun the world size is torchrun's."),
) -> None:
    """Train or fine-tune from a recipe; writes metrics, checkpoints and a memory report to the run directory."""
    from memfit.distributed.runtime import launch, under_torchrun
    from memfit.recipe import load_recipe
    from memfit.report import print_result
    from memfit.train import train as run_train

    rec = load_recipe(recipe, overrides or [])
    run_dir = output or Path(rec.output_dir) / rec.name
    ranks = nproc or rec.distributed.nproc
    if not under_torchrun() and (nproc is not None or ranks > 1):  # this process only launches the ranks
        argv = ["train", str(recipe), *(overrides or []), "--output", str(run_dir)]
        argv += ["--resume"] * resume + ["--overwrite"] * overwrite
        raise typer.Exit(launch(argv, ranks))
    result = run_train(rec, run_dir, resume=resume, overwrite=overwrite, console=console)
    if result.extras.get("rank", 0) == 0:
        print_result(result, console)
    if under_torchrun():
        from memfit.distributed.runtime import shutdown

        shutdown()


@app.command()
@handles_errors
def estimate(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Predict one rank of an FSDP2 run on N "
                                        "processes (train.batch_size is the global batch)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: bytes of every category, their "
                                 "sum, the predicted step peak, precision and model dtype."),
) -> None:
    """Predict peak memory by category for a recipe without training (the model is built on the meta device)."""
    from memfit.plan import estimate_recipe

    breakdown, peak = estimate_recipe(recipe, overrides or [], nproc=nproc)
    from memfit.memory.breakdown import TENSOR_CATEGORIES, format_bytes
    from rich.table import Table

    if as_json:
        import json

        from memfit.recipe import load_recipe

        rec = load_recipe(recipe, overrides or [])
        print(json.dumps({"recipe": str(recipe), "precision": rec.train.precision, "model_dtype": rec.model_dtype,
                          "categories": {c: getattr(breakdown, c) for c in TENSOR_CATEGORIES},
                          "sum_of_category_peaks": breakdown.total, "step_peak": peak,
                          "runtime": breakdown.runtime, "process_peak": peak + breakdown.runtime, "unit": "bytes",
                          "nproc": nproc}, indent=2))
        return

    table = Table(title=f"estimate for {recipe}" + (f", each of {nproc} ranks (FSDP2)" if nproc else ""))
    table.add_column("category")
    table.add_column("peak bytes", justify="right")
    for c in TENSOR_CATEGORIES:
        if getattr(breakdown, c):
            table.add_row(c, format_bytes(getattr(breakdown, c)))
    table.add_row("sum of tensor category peaks", format_bytes(breakdown.total))
    table.add_row("[bold]predicted step peak (tensors)", format_bytes(peak))
    table.add_row("runtime (libraries, allocator; CUDA context)", format_bytes(breakdown.runtime))
    table.add_row("[bold]predicted process peak", format_bytes(peak + breakdown.runtime))
    console.print(table)


@app.command()
@handles_errors
def quickstart(
    output: Path = typer.Option(Path("runs/quickstart"), "--output", "-o", help="Run directory (an earlier "
                                "quickstart run there is replaced; any other folder must be new or empty)."),
    steps: int = typer.Option(200, help="Training steps (about a minute on a laptop CPU)."),
) -> None:
    """Train a small Llama from scratch on bundled Shakespeare, show memory by category and a sample."""
    from memfit.quickstart import run_quickstart

    run_quickstart(output, steps, console)


@app.command()
@handles_errors
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `memfit train`.")) -> None:
    """Print a run's memory report and write its plots (loss.png, memory.png, report.html)."""
    from memfit.report import print_run

    print_run(run_dir, console)


@app.command()
@handles_errors
def bench(
    suite: str = typer.Argument(..., help="Suite name, e.g. baseline, optim, fewer-params, zo, activations, inference."),
    quick: bool = typer.Option(False, "--quick", help="Smaller settings (a smoke run)."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Where JSON and markdown results go."),
    data_dir: Path = typer.Option(Path("../shared/data"), "--data", help="Folder with the shared data sets."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these methods (repeatable)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default: torch's)."),
    precision: Optional[list[str]] = typer.Option(None, "--precision", help="Train precisions to run (repeatable; "
                                                  "32-true, bf16-mixed, bf16-true...; suites that support it)."),
    compile_: bool = typer.Option(False, "--compile", help="Also run each row with train.compile: true "
                                  "(suites that support it)."),
) -> None:
    """Run a benchmark suite side by side and write JSON + a markdown table."""
    import torch

    from memfit.bench.harness import BenchOptions, markdown_table, run_suite

    if threads:
        torch.set_num_threads(threads)
    opts = BenchOptions(quick=quick, out_dir=out, data_dir=data_dir, only=list(only or []),
                        precisions=list(precision or []), compile=compile_)
    rows, json_path, md_path = run_suite(suite, opts)
    console.print(markdown_table(rows), markup=False, soft_wrap=True)
    console.print(f"wrote {json_path} and {md_path}")


from memfit.cli import generate as _generate  # noqa: E402,F401  (registers `memfit generate`, listed last)
from memfit.cli import plan as _plan  # noqa: E402,F401  (registers `memfit plan`)
from memfit.cli import predict as _predict  # noqa: E402,F401  (registers `memfit predict`)
from memfit.cli import plan_generate as _plan_generate  # noqa: E402,F401  (registers `memfit plan-generate`)
from memfit.cli import prune as _prune  # noqa: E402,F401  (registers `memfit prune`)


def main() -> None:
    app()
