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
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help="Memory budget, e.g. 24GiB or 800MiB: the "
                                         "process's peak (CPU RSS, or the GPU's memory) unless --scope tensors; "
                                         "with --generate the tensors' peak. Required unless --generate."),
    scope: str = typer.Option("process", "--scope", help="process (tensors + runtime) or tensors."),
    model: Optional[str] = typer.Option(None, "--model", help="Plan for this model (folder, config.json, named "
                                        "model or hub id) without a recipe."),
    task: str = typer.Option("finetune-causal", "--task", help="With --model: finetune-causal, pretrain-causal, "
                             "finetune-cls, finetune-ner."),
    seq: int = typer.Option(2048, "--seq", help="With --model: sequence length."),
    batch: int = typer.Option(1, "--batch", help="With --model: micro-batch size."),
    device: str = typer.Option("auto", "--device", help="With --model: cpu, cuda or auto."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Plan one rank of an FSDP2 run on N processes "
                                        "(the batch is the global batch; only techniques that run sharded)."),
    generate: bool = typer.Option(False, "--generate", help="Plan a generation instead (weight format × KV "
                                  "policy): the same as `memfit plan-generate MODEL --prompt-tokens P --new-tokens "
                                  "N`; MODEL is --model or the first argument."),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", help="With --generate: prompt length."),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", help="With --generate: tokens to generate."),
    kv_share: float = typer.Option(0.2, "--kv-share", help="With --generate: evicting policies keep this share."),
    measure: bool = typer.Option(False, "--measure", help="With --generate: run the recommendation and show "
                                 "measured vs predicted."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    show: int = typer.Option(12, "--show", help="Rows of the ranked table to print."),
    verify: bool = typer.Option(False, "--verify", help="Run two measured steps of the chosen plan."),
    write: Optional[Path] = typer.Option(None, "--write", help="Write the chosen plan as a recipe YAML."),
) -> None:
    """Enumerate the compatible technique combinations, predict each one's peak, and pick the best that fits."""
    t0 = time.perf_counter()
    if generate:
        from memfit.cli.plan_generate import run_plan_generate

        target = model if model is not None else (str(recipe) if recipe is not None else None)
        if target is None or (model is not None and recipe is not None) or overrides:
            raise ConfigError("memfit plan --generate takes one model: --model DIR or the first argument")
        if prompt_tokens is None or new_tokens is None:
            raise ConfigError("memfit plan --generate needs --prompt-tokens and --new-tokens")
        return run_plan_generate(target, prompt_tokens, new_tokens, budget, kv_share, measure)
    from memfit.plan import parse_bytes
    from memfit.plan import plan as make_plan

    if budget is None:
        raise ConfigError("memfit plan needs --budget, e.g. --budget 24GiB")
    limit = parse_bytes(budget)
    if (recipe is None) == (model is None):
        raise ConfigError("pass a recipe or --model (not both)")
    if verify and nproc and nproc > 1:
        raise ConfigError("--verify runs one process; verify a plan for --nproc by training it: memfit train "
                          "RECIPE --nproc N (write it with --write)")
    if model is not None:
        from memfit.plan.target import recipe_for

        rec, pretrained = recipe_for(model, task, seq=seq, batch=batch, device=device)
    else:
        from memfit.plan.planner import load_recipe_dict

        rec, pretrained = load_recipe_dict(recipe, overrides or []), None
    result = make_plan(rec, limit, scope=scope, pretrained=pretrained, nproc=nproc)
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
    if result.nproc > 1:
        scope += f" of each of {result.nproc} ranks, FSDP2"
    excluded = "declared rules" + (", or they cannot run sharded" if result.nproc > 1 else "")
    console.print(f"{len(result.rows)} compatible combinations ({result.pruned} excluded by the techniques' "
                  f"{excluded}); {len(result.fitting)} fit {format_bytes(result.budget)} ({scope}); task: "
                  f"{result.task_kind}")
    ranks = f", per rank of {result.nproc}" if result.nproc > 1 else ""
    table(result.rows[:show], f"best plans (by expected quality, then predicted speed{ranks})")
    if result.fitting:
        table(result.pareto(), "Pareto set of the plans that fit (peak, tokens/s, expected quality)")
        win = result.chosen
        per_rank = f" per rank ({result.nproc} ranks)" if result.nproc > 1 else ""
        console.print(f"[bold]chosen:[/] {win.label} — predicted {format_bytes(win.process_peak)} process peak "
                      f"({format_bytes(win.peak)} tensors){per_rank}")
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
