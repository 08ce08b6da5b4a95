"""`memfit prune`: a structurally pruned copy of a causal LM (SliceGPT, FLAP, LLM-Pruner) as a plain HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memfit.cli.app import app, console, handles_errors


@app.command("prune")
@handles_errors
def prune_command(
    model: str = typer.Argument(..., help="Local HF model folder or a memfit run directory (Llama, Mistral, Qwen2, "
                                "Qwen3, Gemma or Phi-3)."),
    method: str = typer.Option(..., "--method", "-m", help="slicegpt (delete hidden dimensions), flap (heads and "
                               "MLP channels by fluctuation, bias compensated), llm-pruner (heads and MLP channels "
                               "by Taylor importance)."),
    sparsity: float = typer.Option(0.2, "--sparsity", "-s", help="slicegpt: fraction of the hidden size deleted; "
                                   "flap: fraction of the layers' parameters; llm-pruner: fraction of every "
                                   "layer's heads and MLP channels."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write (new, empty, or an earlier "
                                "`memfit prune` output with --overwrite)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text (UTF-8 file; default: the bundled "
                                         "Shakespeare)."),
    samples: int = typer.Option(32, "--calib-samples", help="Calibration windows."),
    length: int = typer.Option(128, "--calib-len", help="Tokens per calibration window."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier `memfit prune` output."),
) -> None:
    """Prune a model and write config.json + model.safetensors (+ tokenizer): loads with plain transformers."""
    from memfit.memory.breakdown import format_bytes
    from memfit.prune import prune

    result, diff = prune(model, method, sparsity, output, calib=calib, samples=samples, length=length,
                         overwrite=overwrite)
    bytes_ = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    console.print(f"{method} at sparsity {sparsity}: {result.params_before:,} → {result.params_after:,} parameters "
                  f"({result.kept:.1%} kept), {format_bytes(bytes_)} of safetensors, {result.seconds:.1f} s; wrote "
                  f"{output} (reloaded by transformers: logits within {diff:.1e})", soft_wrap=True, highlight=False)
