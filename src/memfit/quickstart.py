"""`memfit quickstart`: train a small Llama from scratch on bundled Shakespeare (public domain), print the
memory report (estimate vs measured, by category) and a generated sample. Needs nothing but the package."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from memfit.errors import RunDirError
from memfit.recipe import load_recipe
from memfit import rundir
from memfit.rundir import is_run, run_name

ASSET = Path(__file__).parent / "assets" / "shakespeare.txt"


def quickstart_recipe(steps: int) -> dict:
    return {
        "name": "quickstart",
        "task": "causal_lm",
        "model": {"preset": "llama-1m"},
        "data": {"kind": "text", "paths": [str(ASSET)], "block_size": 128, "vocab_size": 2048},
        "train": {"steps": steps, "batch_size": 16, "warmup_steps": max(1, steps // 20), "eval_every": 0,
                  "eval_batches": 20, "log_every": 10},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
    }


def run_quickstart(output: Path, steps: int, console: Console) -> None:
    """Train into `output`, replacing an earlier quickstart run there; any other non-empty folder is refused
    (`memfit.rundir`: only files memfit wrote are ever removed)."""
    from memfit.report import print_result
    from memfit.train import train

    recipe = load_recipe(quickstart_recipe(steps))
    earlier = run_name(output) if output.is_dir() and is_run(output) else None
    if earlier not in (None, recipe.name):
        raise RunDirError(f"{output} holds the run '{earlier}', not a quickstart; choose another --output")
    rundir.check(output, overwrite=earlier is not None)  # refuse before printing anything
    console.print(f"[bold]memfit quickstart[/]: {recipe.model.preset} on {ASSET.name}, {steps} steps")
    result = train(recipe, output, console=console, overwrite=earlier is not None)
    print_result(result, console)
    console.print("[bold]sample:[/]")
    console.print(sample(output / "model", "ROMEO:"), markup=False)


def sample(model_dir: Path, prompt: str, max_new_tokens: int = 60) -> str:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
