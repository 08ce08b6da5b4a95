"""`memfit bench inference`: perplexity and KV memory vs KV budget for every policy, kvpress side by side,
and the prefill peak of chunked prefill vs a full prefill.

Model: a causal LM pretrained by memfit's pretrain workload (llama-1m preset at block 512 on War and Peace +
Shakespeare, trained once and cached under `~/.cache/memfit/models/kvbench-lm`), or any local HF causal LM named by
`MEMFIT_INFERENCE_MODEL`. Text: windows of held-out War and Peace (the last 5 %, never trained on).

Rows:
- `context`: prefill a C-token context through the policy (one forward, then eviction, as kvpress does), then score
  the E-token continuation teacher-forced on the compressed cache. Budget = share of C kept per layer and head.
- `stream`: the same text fed 16 tokens at a time with eviction after every chunk (memory bounded throughout);
  perplexity over the same continuation tokens.
- `kvpress`: the same `context` protocol with NVIDIA kvpress's presses, run in kvpress's own venv
  (`MEMFIT_KVPRESS_PYTHON`, default /work/kvpress-venv/bin/python) as a subprocess.
- `prefill`: tensor peak (PyTorch MemTracker, under memfit's MemoryMeter) of a long prefill, full vs chunked with
  eviction, and kvpress's prefill with and without a press (same tracker inside kvpress's venv).
- `peaks`, `speed`, `speculative`: `memfit generate`'s default path per policy, decode speed vs transformers'
  sliding window, self-speculative decoding (`bench/suites/inference_kv.py`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from memfit.bench.harness import BenchOptions, record_all, record_partial
from memfit.bench.suites import inference_kv
from memfit.bench.workloads import pretrained_lm, small_lm_recipe
from memfit.compat import cache_keyword
from memfit.kv import build_policy
from memfit.kv.prefill import chunked_prefill
from memfit.memory.measure import MemoryMeter

CACHED = Path("~/.cache/memfit/models/kvbench-lm").expanduser()
KVPRESS_PYTHON = os.environ.get("MEMFIT_KVPRESS_PYTHON", "/work/kvpress-venv/bin/python")
POLICIES: dict[str, dict[str, Any]] = {
    "streaming_llm": {},
    "h2o": {},
    "snapkv": {"window": 16, "kernel": 7},
    "keyformer": {},
    "pyramid": {"window": 16, "kernel": 7},
    "adakv": {},
}
COMPOSE_CASES: list[tuple[str, float | None, dict[str, Any]]] = [
    ("kivi-4bit (no eviction)", None, {"name": "kivi", "bits": 4}),
    ("kivi-2bit (no eviction)", None, {"name": "kivi", "bits": 2}),
    *((f"h2o {tag}".strip(), ratio, {"name": "h2o", **({"quant": q} if q else {})})
      for ratio in (0.5, 0.2) for tag, q in (("", None), ("+ kivi4", "kivi4"), ("+ kivi2", "kivi2"))),
    *((label, ratio, spec) for ratio in (0.5, 0.2) for label, spec in (
        ("adakv (h2o scores)", {"name": "adakv"}),
        ("snapkv", {"name": "snapkv", "window": 16}),
        ("adakv (snapkv scores)", {"name": "adakv", "scoring": "snapkv", "window": 16}))),
]
KVPRESS_OF = {"streaming_llm": "streaming_llm", "snapkv": "snapkv", "pyramid": "pyramid", "h2o": "observed_attention"}


def pretrain_recipe(data_dir: Path) -> dict[str, Any]:
    return small_lm_recipe("kvbench-lm", data_dir, block_size=512, vocab_size=8192, steps=120, batch_size=2,
                           warmup_steps=12, eval_every=60, eval_batches=4)


def model_dir(opts: BenchOptions) -> Path:
    return pretrained_lm(pretrain_recipe(Path(opts.data_dir)), CACHED)


def heldout_windows(tokenizer, data_dir: Path, n: int, length: int) -> list[list[int]]:
    text = (data_dir / "warpeace/input.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[int(len(text) * 0.95):])["input_ids"]
    stride = max(length, (len(ids) - length) // max(1, n - 1))
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, stride)][:n]


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()


@torch.no_grad()
def context_ppl(model, policy, windows, context: int) -> tuple[float, int]:
    """Compress the context once (one prefill forward), then score continuation[1:] teacher-forced."""
    nll, count, kv = 0.0, 0, 0
    for w in windows:
        ids = torch.tensor([w])
        cache = policy.make_cache(model)
        model(ids[:, :context], **{cache_keyword(model): cache})
        kv = max(kv, cache.nbytes())
        cont = ids[:, context:]
        logits = model(cont, **{cache_keyword(model): cache}).logits[0, :-1]
        nll += _nll(logits, cont[0, 1:])
        count += cont.shape[1] - 1
    return math.exp(nll / count), kv


@torch.no_grad()
def stream_ppl(model, policy, windows, context: int, chunk: int = 16) -> tuple[float, int]:
    """Feed the whole window `chunk` tokens at a time (eviction after each); score continuation[1:]."""
    nll, count, kv = 0.0, 0, 0
    for w in windows:
        ids = torch.tensor([w])
        cache = policy.make_cache(model)
        logits = []
        for start in range(0, ids.shape[1], chunk):
            logits.append(model(ids[:, start:start + chunk], **{cache_keyword(model): cache}).logits[0])
            kv = max(kv, cache.nbytes())
        logits = torch.cat(logits)
        nll += _nll(logits[context:-1], ids[0, context + 1:])
        count += ids.shape[1] - context - 1
    return math.exp(nll / count), kv


def run(opts: BenchOptions) -> list[dict]:
    from memfit.generate import load_causal_lm

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data_dir = Path(opts.data_dir)
    path = model_dir(opts)
    n_windows = 2 if opts.quick else 4
    context, cont = (256, 64) if opts.quick else (384, 128)
    ratios = (0.5, 0.2) if opts.quick else (0.5, 0.2, 0.1)
    eager, tokenizer = load_causal_lm(path, "eager")
    windows = heldout_windows(tokenizer, data_dir, n_windows, context + cont)
    rows: list[dict] = []

    def row(section, method, source, ratio, ppl, base_ppl, kv, base_kv, seconds, **extra):
        rows.append({"section": section, "method": method, "source": source, "budget_pct": round(100 * ratio),
                     "budget_tokens": round(ratio * context), "ppl": ppl, "ppl_vs_full": ppl / base_ppl,
                     "peak_kv": kv, "kv_vs_full": kv / base_kv if base_kv else None, "seconds": seconds, **extra})
        record_partial(opts, rows[-1])

    full = build_policy("full")
    t = time.perf_counter()
    base_ppl, base_kv = context_ppl(eager, full, windows, context)
    row("context", "full", "memfit", 1.0, base_ppl, base_ppl, base_kv, base_kv, time.perf_counter() - t)
    s_base, s_kv = stream_ppl(eager, full, windows, context)
    row("stream", "full", "memfit", 1.0, s_base, s_base, s_kv, s_kv, 0.0)
    for name, extra in POLICIES.items():
        if not opts.wants(name):
            continue
        for ratio in ratios:
            policy = build_policy(name, budget=round(ratio * context), **extra)
            t = time.perf_counter()
            ppl, kv = context_ppl(eager, policy, windows, context)
            row("context", name, "memfit", ratio, ppl, base_ppl, kv, base_kv, time.perf_counter() - t)
            t = time.perf_counter()
            ppl, kv = stream_ppl(eager, policy, windows, context)
            row("stream", name, "memfit", ratio, ppl, s_base, kv, s_kv, time.perf_counter() - t)
    if opts.wants("kivi"):
        for bits in (8, 4, 2):
            policy = build_policy("kivi", bits=bits, residual=32)
            t = time.perf_counter()
            ppl, kv = context_ppl(eager, policy, windows, context)
            row("context", f"kivi-{bits}bit", "memfit", 1.0, ppl, base_ppl, kv, base_kv, time.perf_counter() - t)
    if opts.wants("compose"):  # issue 16 item 2: h2o alone, KIVI alone, both; uniform vs Ada-KV per-head budgets
        for label, ratio, spec in COMPOSE_CASES:
            budget = {"budget": round(ratio * context)} if ratio else {}
            policy = build_policy(**spec, **budget)
            for section, fn, base, base_bytes in (("context", context_ppl, base_ppl, base_kv),
                                                  ("stream", stream_ppl, s_base, s_kv)):
                t = time.perf_counter()
                ppl, kv = fn(eager, policy, windows, context)
                row(section, label, "memfit", ratio or 1.0, ppl, base, kv, base_bytes, time.perf_counter() - t)
    if opts.wants("kvpress"):
        record_all(opts, rows, kvpress_rows(path, windows, context, ratios, base_ppl, base_kv, (1024 if opts.quick else 2048)))
    if opts.wants("prefill"):
        record_all(opts, rows, prefill_rows(path, 1024 if opts.quick else 2048))
    if opts.wants("peaks"):
        record_all(opts, rows, inference_kv.peak_rows(path, 1024 if opts.quick else 2048))
    if opts.wants("speed"):
        record_all(opts, rows, inference_kv.speed_rows(path, reps=3 if opts.quick else 5))
    if opts.wants("speculative"):
        record_all(opts, rows, inference_kv.speculative_rows(path))
    return rows


def kvpress_rows(path: Path, windows, context: int, ratios, base_ppl: float, base_kv: int,
                 peak_len: int) -> list[dict]:
    if not Path(KVPRESS_PYTHON).exists():
        return [{"section": "context", "method": "kvpress", "source": "kvpress",
                 "note": f"kvpress venv not found at {KVPRESS_PYTHON} (set MEMFIT_KVPRESS_PYTHON)"}]
    runner = Path(__file__).resolve().parent.parent / "kvpress_runner.py"
    job = {"model": str(path), "windows": [[w[:context], w[context:]] for w in windows], "ratios": list(ratios),
           "presses": ["streaming_llm", "snapkv", "pyramid", "observed_attention"], "peak_len": peak_len,
           "peak_ratio": 0.1}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    t = time.perf_counter()
    proc = subprocess.run([KVPRESS_PYTHON, str(runner), f.name], capture_output=True, text=True, check=False)
    os.unlink(f.name)
    if proc.returncode != 0:
        return [{"section": "context", "method": "kvpress", "source": "kvpress",
                 "note": "kvpress failed: " + proc.stderr.strip().splitlines()[-1][:200]}]
    out = []
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        if r["press"].startswith("prefill-peak"):
            out.append({"section": "prefill", "method": r["press"].replace("prefill-peak:", "kvpress "),
                        "source": f"kvpress {r['transformers']}",
                        "budget_pct": round(100 * r["ratio"]), "prefill_len": r["prefill_len"],
                        "peak_tensors": r["tensor_peak"], "kept_tokens": r["kept_tokens"]})
            continue
        out.append({"section": "context", "method": r["press"], "source": f"kvpress {r['transformers']}",
                    "budget_pct": round(100 * r["ratio"]), "budget_tokens": round(r["kept_tokens"]),
                    "ppl": r["ppl"], "ppl_vs_full": r["ppl"] / base_ppl, "seconds": r["seconds"],
                    "note": f"continuation scored {r['scored_by']}"})
    out[-1]["seconds_total"] = time.perf_counter() - t
    return out


def prefill_rows(path: Path, length: int) -> list[dict]:
    """Tensor peak of one long prefill: the full cache at once vs chunked prefill with eviction."""
    from memfit.generate import load_causal_lm
    from memfit.memory import process

    rows = []
    budget = length // 10
    cases = [("full, one forward", "sdpa", "full", {}, length),
             ("streaming_llm 10%, chunk 128", "sdpa", "streaming_llm", {"budget": budget}, 128),
             ("full, one forward", "eager", "full", {}, length),
             ("h2o 10%, chunk 128", "eager", "h2o", {"budget": budget}, 128),
             ("snapkv 10%, chunk 128", "eager", "snapkv", {"budget": budget}, 128)]
    models = {}
    for label, attn, name, opts, chunk in cases:
        if attn not in models:
            models[attn] = load_causal_lm(path, attn)[0]
        model = models[attn]
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        policy = build_policy(name, **opts)
        meter = MemoryMeter(model)
        start_rss = process.current_rss()
        with meter.region():
            cache = policy.make_cache(model)
            chunked_prefill(model, ids, cache, chunk)
        rep = meter.report()
        rows.append({"section": "prefill", "method": f"{label} ({attn})", "source": "memfit",
                     "budget_pct": 10 if name != "full" else 100, "prefill_len": length,
                     "peak_tensors": rep.tensor_peak, "peak_kv": cache.nbytes(),
                     "process_peak": (rep.process_peak - start_rss) if rep.process_peak and start_rss else None})
    return rows
