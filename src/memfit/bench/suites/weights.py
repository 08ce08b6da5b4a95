"""`memfit bench weights`: size and perplexity of every weight format, and streaming's peak vs in-memory.

Sections (rows):
- `format`: the quality bench model (`bench.workloads.quality_lm`: a 5M-parameter Llama, BPE 512, trained once
  at block 512 on War and Peace + Shakespeare + WikiText-2 valid, cached under `~/.cache/memfit/models/quality-lm`;
  or any HF causal LM named by `MEMFIT_INFERENCE_MODEL`), quantized with each format; perplexity on held-out War
  and Peace windows of 512 tokens (last 5 %), bytes per quantized parameter, weight bytes.
  `bnb-nf4` is bitsandbytes' own NF4 round trip of the same weights (reference). AWQ calibrates on 16×128 tokens
  from the *start* of War and Peace (training text, disjoint from the held-out tail).
- `stream`: a llama-20m-shaped model (random weights; memory does not depend on training) saved as safetensors and
  generating 16 tokens, each mode in a fresh subprocess: transformers' in-memory `from_pretrained` vs
  `StreamedModel` (window 1/2/4) vs an int4 checkpoint streamed; process peak (VmHWM) above the pre-load RSS,
  resident weight bytes counted by the streamer, tokens/s, and token-for-token equality with in-memory. With a
  budget (the non-layer weights + half or a quarter of the layers + the window of 2), as many first layers as fit
  stay resident and the rest stream.
- `encoder`: SST-2 accuracy / CoNLL F1 per weight format (`weights_encoder.py`; needs MEMFIT_CLS_RUN /
  MEMFIT_NER_RUN).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from memfit.bench.harness import BenchOptions, record_all, record_partial
from memfit.bench.workloads import quality_lm

MIB = 2**20


def _linear_stats(model) -> tuple[int, int]:
    """(bytes of the quantized linears' storage, their parameter count); dense linears count 4 bytes/param."""
    from memfit.weights.quant import QuantLinear, quantizable_linears

    nbytes = n = 0
    for _, m in model.named_modules():
        if isinstance(m, QuantLinear):
            nbytes += m.quantized_bytes()
            n += m.in_features * m.out_features
    if n == 0:
        for _, lin in quantizable_linears(model):
            nbytes += lin.weight.numel() * lin.weight.element_size()
            n += lin.weight.numel()
    return nbytes, n


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def _bnb_nf4(model):
    """Reference: every linear replaced by bitsandbytes' NF4 quantize -> dequantize (block 64, double quant)."""
    import bitsandbytes.functional as bnbf

    from memfit.weights.quant import quantizable_linears

    for _, lin in quantizable_linears(model):
        q, state = bnbf.quantize_4bit(lin.weight.data, blocksize=64, quant_type="nf4", compress_statistics=True)
        lin.weight.data = bnbf.dequantize_4bit(q, state).to(lin.weight.dtype)
    return model


FORMATS: list[tuple[str, str, int | None]] = [
    # method, fmt for apply_weights, group_size
    ("int8", "int8", None),
    ("int4-g128", "int4", 128),
    ("int4-g64", "int4", 64),
    ("nf4-g64", "nf4", 64),
    ("bnb-nf4", "bnb", 64),
    ("awq-int4-g64", "awq", 64),
    ("int4-channel", "int4", 0),
    ("awq-int4-channel", "awq", 0),
    ("int3-g64", "int3", 64),
    ("awq-int3-g64", "awq3", 64),
    ("bf16", "bf16", None),  # the reference DFloat11 must reproduce exactly
    ("dfloat11", "dfloat11", None),  # on the bf16 model: lossless with respect to it
    ("bitstack-k2", "bitstack", 2),  # group_size column: blocks kept (rank BITSTACK_RANK)
    ("bitstack-k4", "bitstack", 4),
    ("bitstack-k8", "bitstack", 8),
]
BITSTACK_RANK = 8
EMBED = "+embed"
"""Suffix of the rows that also store the embedding table and the output layer in the format."""
FORMATS += [(m + EMBED, f, g) for m, f, g in FORMATS if m in ("int8", "int4-g64", "nf4-g64", "awq-int4-g64", "dfloat11")]


WINDOW = 512
"""Perplexity windows: the quality model's training block."""


def lm_dir(opts: BenchOptions) -> Path:
    """MEMFIT_INFERENCE_MODEL if set, else the quality bench model (trained once, cached)."""
    return quality_lm(Path(opts.data_dir))


def format_rows(opts: BenchOptions) -> list[dict]:
    from memfit.bench.suites.inference import heldout_windows
    from memfit.generate import load_causal_lm
    from memfit.weights import apply_weights, weight_bytes
    from memfit.weights.awq import awq_quantize
    from memfit.weights.bitstack import BitStackFormat
    from memfit.weights.embedding import quantize_embeddings
    from memfit.weights.linear import quantize_model

    data_dir = Path(opts.data_dir)
    path = lm_dir(opts)
    dense, tokenizer = load_causal_lm(path, "sdpa")
    dense.eval()
    n_windows, length = (16, WINDOW) if opts.quick else (48, WINDOW)
    windows = heldout_windows(tokenizer, data_dir, n_windows, length)
    text = (data_dir / "warpeace/input.txt").read_text(encoding="utf-8")
    calib_ids = torch.tensor(tokenizer(text[: 200_000])["input_ids"][: 16 * 128]).reshape(16, 128)

    rows: list[dict] = []
    base_ppl = perplexity(dense, windows)
    base_bytes = weight_bytes(dense)
    lb, ln = _linear_stats(dense)
    rows.append({"section": "format", "method": "fp32", "model": path.parent.name, "group_size": None,
                 "linear_bytes_per_param": lb / ln, "weight_mib": base_bytes / MIB, "weight_vs_fp32": 1.0, "ppl": base_ppl, "ppl_vs_fp32": 1.0,
                 "quantize_s": 0.0})
    for method, fmt, group in FORMATS:
        if not opts.wants(method):
            continue
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        if fmt == "bnb":
            _bnb_nf4(model)
        elif fmt in ("awq", "awq3"):
            awq_quantize(model, calib_ids, group_size=group, bits=3 if fmt == "awq3" else 4)
        elif fmt in ("bf16", "dfloat11"):
            model = model.to(torch.bfloat16)
            if fmt == "dfloat11":
                apply_weights(model, fmt)
        elif fmt == "bitstack":
            quantize_model(model, BitStackFormat(blocks=group, rank=BITSTACK_RANK))
        else:
            apply_weights(model, fmt, group_size=group)
        if method.endswith(EMBED):
            quantize_embeddings(model, "int4" if fmt == "awq" else fmt, None if fmt == "bitstack" else group)
        q_s = time.perf_counter() - t
        ppl = perplexity(model, windows)
        if fmt == "bnb":  # reference quality only: the weights were dequantized back to fp32 in place
            lb, ln, wbytes = 0.5 + 1 / 64 + 4 / (64 * 256), 1, None
        else:
            lb, ln = _linear_stats(model)
            lb, wbytes = lb / ln, weight_bytes(model)
        rows.append({"section": "format", "method": method, "group_size": group, "linear_bytes_per_param": lb,
                     "weight_mib": wbytes / MIB if wbytes else None,
                     "weight_vs_fp32": wbytes / base_bytes if wbytes else None, "ppl": ppl,
                     "ppl_vs_fp32": ppl / base_ppl, "quantize_s": q_s})
        record_partial(opts, {"workload": "format", **rows[-1]})
    return rows


# --- streaming: each mode in a fresh process so VmHWM is its own -------------------------------------------------

def _stream_child(args: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    from memfit.memory import process
    from memfit.models import build_llama
    from memfit.weights import load_quantized
    from memfit.weights.streaming import StreamedModel

    torch.set_num_threads(args.get("threads", 2))
    # warm up every code path (lazy imports, allocator, generation utils) so the peak is the model's, not theirs
    with torch.no_grad():
        build_llama("llama-tiny", 256).generate(input_ids=torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2,
                                                do_sample=False, pad_token_id=0)
    torch.manual_seed(0)
    ids = torch.randint(0, args["vocab"], (1, args["prompt"]))
    process.reset_peak()
    rss0 = process.current_rss()
    t0 = time.perf_counter()
    resident = None
    if args["mode"] == "memory":
        model = AutoModelForCausalLM.from_pretrained(args["dir"]).eval()
    elif args["mode"] == "memory-quantized":
        model = load_quantized(args["dir"]).eval()
    else:
        model = StreamedModel.from_pretrained(args["dir"], window=args["window"], budget_bytes=args.get("budget"))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=args["new"], do_sample=False, pad_token_id=0)
    gen_s = time.perf_counter() - t0
    layers = None
    if args["mode"] == "stream":
        resident, layers = model.peak_resident_bytes, model.resident_layers
        model.close()
    print("RESULT" + json.dumps({"rss0": rss0, "peak": process.peak(), "tokens": out[0].tolist(),
                                 "resident": resident, "load_s": load_s, "gen_s": gen_s,
                                 "resident_layers": layers}))


def _run_child(args: dict[str, Any]) -> dict[str, Any]:
    code = f"from memfit.bench.suites.weights import _stream_child; _stream_child({args!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"streaming child failed: {proc.stderr[-2000:]}")


def stream_rows(opts: BenchOptions) -> list[dict]:
    from memfit.models import build_llama
    from memfit.weights import apply_weights, save_quantized, weight_bytes

    preset = "llama-1m" if opts.quick else "llama-20m"
    vocab = 8192
    new = 8 if opts.quick else 16
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, q_dir = Path(tmp) / "dense", Path(tmp) / "int4"
        model = build_llama(preset, vocab, seed=0).eval()
        total = weight_bytes(model)
        layers = [weight_bytes(layer) for layer in model.model.layers]
        static = total - sum(layers)
        budgets = {f"stream budget {k}/{len(layers)} layers resident w=2": static + sum(layers[:k]) + 2 * max(layers)
                   for k in (len(layers) // 2, len(layers) // 4)}
        model.save_pretrained(dense_dir)
        apply_weights(model, "int4", group_size=64)
        q_total = weight_bytes(model)
        save_quantized(model, q_dir)
        del model
        modes = [("in-memory (transformers)", "memory", dense_dir, None, total),
                 ("stream w=1", "stream", dense_dir, 1, total),
                 ("stream w=2", "stream", dense_dir, 2, total),
                 ("stream w=4", "stream", dense_dir, 4, total),
                 *[(method, "stream", dense_dir, 2, total) for method in budgets],
                 ("int4 in-memory", "memory-quantized", q_dir, None, q_total),
                 ("int4 stream w=2", "stream", q_dir, 2, q_total)]
        refs: dict[str, dict] = {}  # in-memory result per checkpoint: what streaming must reproduce
        for method, mode, path, window, wbytes in modes:
            if not opts.wants(method):
                continue
            budget = budgets.get(method)
            res = _run_child({"mode": mode, "dir": str(path), "window": window, "vocab": vocab, "prompt": 32,
                              "new": new, "budget": budget})
            if mode != "stream":
                refs[str(path)] = res
            ref = refs.get(str(path))
            base = refs.get(str(dense_dir))
            peak = res["peak"] - res["rss0"]
            rows.append({"section": "stream", "method": method, "model": preset, "weight_mib": wbytes / MIB,
                         "resident_weights_mib": (res["resident"] or wbytes) / MIB,
                         "process_peak_above_start_mib": peak / MIB,
                         "process_peak_ratio": None if base is None else peak / (base["peak"] - base["rss0"]),
                         "tokens_per_s": new / res["gen_s"], "load_s": res["load_s"],
                         "resident_layers": res.get("resident_layers"),
                         "speed_vs_in_memory": None if base is None else base["gen_s"] / res["gen_s"],
                         "same_tokens": None if ref is None else res["tokens"] == ref["tokens"]})
    return rows


def run(opts: BenchOptions) -> list[dict]:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from memfit.bench.suites import weights_encoder

    rows: list[dict] = []
    for section in (format_rows, stream_rows, weights_encoder.rows):
        record_all(opts, rows, section(opts))
    return rows


if __name__ == "__main__":  # pragma: no cover - manual runs
    out = run(BenchOptions(quick="--quick" in sys.argv))
    print(json.dumps(out, indent=1))
    os._exit(0)
