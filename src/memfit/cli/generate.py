"""`memfit generate`: text from a causal LM under a KV policy and weight format, with its memory report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from memfit.cli.app import app, console, handles_errors
from memfit.errors import ConfigError


@app.command("generate")
@handles_errors
def generate_command(
    model: str = typer.Argument(..., help="Local HF model folder, a memfit run directory, or a named model."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    kv: str = typer.Option("full", "--kv", help="KV policy: full, streaming_llm, h2o, snapkv, keyformer, pyramid, "
                           "adakv, kivi, gear."),
    kv_budget: Optional[str] = typer.Option(None, "--kv-budget", help="Tokens kept per layer and head (e.g. 256), "
                                            "a share of the prompt (e.g. 20%), or the cache's bytes (e.g. 64MiB: "
                                            "the most tokens whose cache fits). kivi: optional."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="kivi/gear: 2, 4 or 8 bits."),
    kv_quant: Optional[str] = typer.Option(None, "--kv-quant", help="h2o/keyformer: store the kept tokens "
                                           "KIVI-quantized: kivi2, kivi4 or kivi8 (--kv-budget in bytes counts the "
                                           "quantized bytes)."),
    kv_window: Optional[int] = typer.Option(None, "--kv-window", help="snapkv/pyramid: observation window."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weight format: int8, int4, nf4, awq."),
    quantize_embeddings: bool = typer.Option(False, "--quantize-embeddings", help="With --weights: store the "
                                             "embedding table and the output layer in the format too."),
    stream: bool = typer.Option(False, "--stream", help="Stream layers from disk (weights beyond memory)."),
    attn: str = typer.Option("auto", "--attn", help="auto (eager when the policy needs attention scores), eager, "
                             "sdpa."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="Feed the prompt in chunks of this "
                                                "many tokens so the cache compresses during prefill (default: "
                                                "chosen from the budget for every evicting or quantizing policy; "
                                                "0: the whole prompt in one forward)."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Generate text and show where memory went: weights, KV cache, activations, process peak."""
    from memfit.generate import generate

    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompt-file PATH")
    if prompt_file is not None:
        from memfit.data.io import existing_file, read_utf8

        prompt = read_utf8(existing_file(prompt_file, "prompt file", "--prompt-file"), "prompt file")
    options = {"bits": kv_bits, "window": kv_window, "quant": kv_quant}
    result = generate(model, prompt, max_new_tokens, kv=kv, kv_budget=kv_budget, kv_options=options,
                      weights=weights, quantize_embeddings=quantize_embeddings, stream=stream, attn=attn, prefill_chunk=prefill_chunk, do_sample=sample,
                      temperature=temperature, seed=seed)
    console.print(result.text, markup=False, highlight=False)
    console.print(result.table())
    console.print(f"{result.prompt_tokens} prompt + {result.new_tokens} new tokens, KV policy {result.policy}; "
                  f"prefill {result.prefill_tokens_per_s:,.0f} tokens/s ({result.prefill_seconds:.2f} s), "
                  f"decoding {result.tokens_per_s:.1f} tokens/s ({result.decode_seconds:.2f} s), "
                  f"timed without the memory tracker", soft_wrap=True)
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
