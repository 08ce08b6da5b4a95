"""`memfit plan-generate`: weight format × KV policy that fit a generation in a byte budget (`memfit.plan.generate`)."""

from __future__ import annotations

from typing import Optional

import typer

from memfit.cli.app import app, console, handles_errors


@app.command("plan-generate")
@handles_errors
def plan_generate_command(
    model: str = typer.Argument(..., help="Local HF model folder, a memfit run directory, or a named model."),
    prompt_tokens: int = typer.Option(..., "--prompt-tokens", help="Prompt length in tokens."),
    new_tokens: int = typer.Option(..., "--new-tokens", help="Tokens to generate."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Tensor memory budget, e.g. 64MiB."),
    kv_share: float = typer.Option(0.2, "--kv-share", help="Evicting policies keep this share of the context."),
    measure: bool = typer.Option(False, "--measure", help="Run the recommendation and show measured vs predicted."),
) -> None:
    """Predict the generation peak of every weights × KV-policy combination; recommend the best that fits
    (also `memfit plan --generate`)."""
    run_plan_generate(model, prompt_tokens, new_tokens, budget, kv_share, measure)


def run_plan_generate(model: str, prompt_tokens: int, new_tokens: int, budget: Optional[str], kv_share: float,
                      measure: bool) -> None:
    """`memfit plan-generate` and `memfit plan --generate`: print the table and the recommendation."""
    from rich.table import Table

    from memfit.errors import ConfigError
    from memfit.generate import load_causal_lm
    from memfit.kv.budget import parse_size
    from memfit.memory.breakdown import format_bytes
    from memfit.plan.generate import measure_plan, plan_generation

    limit = parse_size(budget) if budget is not None else None
    if budget is not None and not limit:
        raise ConfigError(f"--budget must be a size like 64MiB, got '{budget}'")
    lm, tokenizer = load_causal_lm(model, "sdpa")
    rows = plan_generation(lm, prompt_tokens, new_tokens, kv_share)
    table = Table(title=f"generation plans: {prompt_tokens} prompt + {new_tokens} new tokens")
    for col in ("plan", "weights", "prefill peak", "decode peak", "predicted peak", "fits"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    best = None
    for r in rows:
        fits = limit is None or r.peak <= limit
        best = best or (r if fits else None)
        table.add_row(r.label(), format_bytes(r.weights_bytes), format_bytes(r.prefill_peak),
                      format_bytes(r.decode_peak), format_bytes(r.peak), "yes" if fits else "no")
    console.print(table)
    if best is None:
        raise ConfigError(f"nothing fits in {budget}: the smallest plan needs {format_bytes(min(r.peak for r in rows))}")
    console.print(f"recommended: {best.label()} — predicted tensor peak {format_bytes(best.peak)}")
    if measure:
        measured = measure_plan(lm, tokenizer, best, prompt_tokens, new_tokens)
        console.print(f"measured tensor peak {format_bytes(measured)} (predicted {format_bytes(best.peak)}, "
                      f"{best.peak / measured:.2f}×)")
