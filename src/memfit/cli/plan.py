"""`memfit plan`: the best plan that fits a memory budget, for a recipe or for a model the user names."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from memfit.cli.app import app, console, handles_errors
from memfit.errors import ConfigError


@app.command("plan")
@handles_errors
def plan_command(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (model, data, batch, sequence); or use --model."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
    budget: str = typer.Option(..., "--budget", "-b", help="Memory budget, e.g. 24GiB or 800MiB: the process's peak "
                               "(CPU RSS, or the GPU's memory) unless --scope tensors."),
    scope: str = typer.Option("process", "--scope", help="process (tensors + runtime) or tensors."),
    model: Optional[str] = typer.Option(None, "--model", help="Plan for this model (folder, config.json, named "
                                        "model or hub id) without a recipe."),
    task: str = typer.Option("finetune-causal", "--task", help="With --model: finetune-causal, pretrain-causal, "
                             "finetune-cls, finetune-ner."),
    seq: int = typer.Option(2048, "--seq", help="With --model: sequence length."),
    batch: int = typer.Option(1, "--batch", help="With --model: micro-batch size."),
    device: str = typer.Option("auto", "--device", help="With --model: cpu, cuda or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    show: int = typer.Option(12, "--show", help="Rows of the ranked table to print."),
    verify: bool = typer.Option(False, "--verify", help="Run two measured steps of the chosen plan."),
    write: Optional[Path] = typer.Option(None, "--write", help="Write the chosen plan as a recipe YAML."),
) -> None:
    """Enumerate the compatible technique combinations, predict each one's peak, and pick the best that fits."""
    t0 = time.perf_counter()
    from memfit.plan import parse_bytes
    from memfit.plan import plan as make_plan

    limit = parse_bytes(budget)
    if (recipe is None) == (model is None):
        raise ConfigError("pass a recipe or --model (not both)")
    if model is not None:
        from memfit.plan.target import recipe_for

        rec, pretrained = recipe_for(model, task, seq=seq, batch=batch, device=device)
    else:
        from memfit.plan.planner import load_recipe_dict

        rec, pretrained = load_recipe_dict(recipe, overrides or []), None
    result = make_plan(rec, limit, scope=scope, pretrained=pretrained)
    chosen = result.chosen if result.fitting else None
    if as_json:
        console.print_json(json.dumps({**result.to_dict(), "wall_s": round(time.perf_counter() - t0, 2),
                                       "cpu_s_since_start": round(time.process_time(), 2)}))
    else:
        _print(result, show)
    if chosen is None:
        result.chosen  # raises BudgetError naming the smallest plan
    if write:
        import yaml

        write.write_text(yaml.safe_dump(chosen.recipe, sort_keys=False))
        note = " (replace the data placeholder before training)" if model is not None else ""
        console.print(f"wrote {write}{note}")
    if verify:
        _verify(chosen, limit, scope)
    if not as_json:
        console.print(f"[dim]planned in {time.perf_counter() - t0:.1f} s wall, {time.process_time():.1f} s CPU since "
                      f"start (choosing: {result.wall_seconds:.2f} s wall, {result.seconds:.2f} s CPU)[/]")


def _print(result, show: int) -> None:
    from rich.table import Table

    from memfit.memory.breakdown import format_bytes

    def table(rows, title):
        t = Table(title=title)
        for col in ("plan", "quality", "tokens/s", "params", "grads", "optimizer", "activations", "runtime",
                    "tensor peak", "process peak", "fits"):
            t.add_column(col, justify="left" if col == "plan" else "right")
        for r in rows:
            if r.breakdown is None:
                t.add_row(r.label, f"{r.quality:.3f}", "", "", "", "", "", "", "-", "-", f"n/a: {r.problem[:50]}")
                continue
            b = r.breakdown
            t.add_row(r.label, f"{r.quality:.3f}", f"{r.tokens_per_s:,.0f}", format_bytes(b.parameters),
                      format_bytes(b.gradients), format_bytes(b.optimizer), format_bytes(b.activations),
                      format_bytes(b.runtime), format_bytes(r.peak), format_bytes(r.process_peak),
                      "[green]yes" if r.fits else "[red]no")
        console.print(t)

    scope = "process peak" if result.scope == "process" else "tensor peak"
    console.print(f"{len(result.rows)} compatible combinations ({result.pruned} excluded by the techniques' declared "
                  f"rules); {len(result.fitting)} fit {format_bytes(result.budget)} ({scope}); task: "
                  f"{result.task_kind}")
    table(result.rows[:show], "best plans (by expected quality, then predicted speed)")
    if result.fitting:
        table(result.pareto(), "Pareto set of the plans that fit (peak, tokens/s, expected quality)")
        win = result.chosen
        console.print(f"[bold]chosen:[/] {win.label} — predicted {format_bytes(win.process_peak)} process peak "
                      f"({format_bytes(win.peak)} tensors)")
        console.print(f"why: {result.why()}")


def _verify(chosen, limit: int, scope: str) -> None:
    from memfit.memory.breakdown import format_bytes
    from memfit.plan import verify as run_verify

    result = run_verify(chosen)
    console.print(result.memory.table(result.estimate, estimate_peak=result.estimate_peak))
    measured = result.memory.tensor_peak if scope == "tensors" else result.memory.process_peak
    predicted = chosen.scoped(scope)
    verdict = "[green]within budget" if measured <= limit else "[red]OVER budget"
    console.print(f"measured {scope} peak {format_bytes(measured)} vs predicted {format_bytes(predicted)} "
                  f"({measured / predicted:.2f}×): {verdict}")
