"""`memfit predict`: labels or entities from a classification / NER run, in a weight format, as JSON lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from memfit.cli.app import app, err_console, handles_errors
from memfit.errors import ConfigError


@app.command("predict")
@handles_errors
def predict_command(
    run: str = typer.Argument(..., help="A memfit classification or NER run directory, or a model folder."),
    text: Optional[list[str]] = typer.Option(None, "--text", "-t", help="A text to label (repeatable)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Label every line of this file."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weight format: int8, int4, nf4, dfloat11, "
                                          "bitstack."),
    quantize_embeddings: bool = typer.Option(False, "--quantize-embeddings", help="With --weights: the "
                                             "embedding tables in the format too."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the JSON lines here (default: stdout)."),
) -> None:
    """Label texts: {"text", "label", "score"} (classification) or {"text", "entities": [{"start", "end", "label",
    "text"}]} (NER) per line, then latency per text and memory on stderr."""
    from memfit.memory.breakdown import format_bytes
    from memfit.predict import predict

    if (not text) == (file is None):
        raise ConfigError("give --text TEXT (repeatable) or --file PATH, not both")
    if file is not None:
        from memfit.data.io import existing_file, read_utf8

        texts = read_utf8(existing_file(file, "input file", "--file"), "input file").splitlines()
    else:
        texts = list(text)
    result = predict(run, texts, weights=weights, quantize_embeddings=quantize_embeddings)
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in result.records) + "\n"
    if out is not None:
        out.write_text(lines, encoding="utf-8")
    else:
        typer.echo(lines, nl=False)
    peak = "" if result.process_peak is None else f", process peak {format_bytes(result.process_peak)}"
    err_console.print(f"{len(result.records)} texts ({result.task}, weights {weights or 'as trained'}): "
                  f"{1e3 * result.seconds_per_text:.1f} ms per text; weights {format_bytes(result.weight_bytes)}, "
                  f"tensor peak {format_bytes(result.tensor_peak)}{peak}", soft_wrap=True)
