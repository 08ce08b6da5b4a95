"""`memfit bench activations`: activation-memory techniques on the pretrain workload.

Two parts:
1. `sweep` rows — the pretrain recipe (tokenizer, data, loop) with a small Llama (`llama-1m`, the workload's 8k
   vocabulary) at batch 1 and several sequence lengths, for each technique and combination: peak tensor memory by
   category over the first two steps (the second has optimizer state, as the estimate assumes), the predicted
   step peak, and tokens/s of the unmeasured third step.
2. `budget` rows — the longest sequence that fits a fixed budget, the tensor peak (parameters + gradients +
   activations + temporaries; no optimizer) that plain backprop needs at 512 tokens. The estimate proposes the
   longest length (bisection, multiples of 64); a measured forward+backward at that length decides, stepping
   down 10 % while the measured peak exceeds the budget (measuring is slow on CPU, so the estimate steers).
   The StreamBP / checkpointing ratio is printed next to the paper's 2.8–5.5×.
Long sequences (4096) run only for baseline, ckpt+chunked_ce and streambp, to stay inside the 15-minute budget.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from memfit.bench.harness import BenchOptions, train_row
from memfit.bench.workloads import workload

PRESET = "llama-1m"
VOCAB = 8192  # the pretrain workload's BPE vocabulary

METHODS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "checkpointing": {"activations": [{"name": "checkpointing"}]},
    "ckpt-mlp": {"activations": [{"name": "checkpointing", "modules": ["LlamaMLP"]}]},
    "chunked_ce": {"activations": [{"name": "chunked_ce", "chunk_size": 512}]},
    "ckpt+chunked_ce": {"activations": [{"name": "checkpointing"}, {"name": "chunked_ce", "chunk_size": 512}]},
    "mesa": {"activations": [{"name": "mesa"}]},
    "s2a+chunked_ce": {"activations": [{"name": "s2a"}, {"name": "chunked_ce", "chunk_size": 512}]},
    "offload(cpu: no-op)": {"activations": [{"name": "offload"}]},
    "streambp": {"activations": [{"name": "streambp", "chunk_size": 256}]},
    "wta_crs(0.3)": {"activations": [{"name": "wta_crs", "budget": 0.3}]},
    "ckpt+chunked_ce+layerwise": {"activations": [{"name": "checkpointing"}, {"name": "chunked_ce", "chunk_size": 512}],
                                  "optimizer": {"name": "adamw", "lr": 2.0e-3, "layerwise": True}},
}
BUDGET_METHODS = ["baseline", "checkpointing", "ckpt+chunked_ce", "s2a+chunked_ce", "streambp"]
BUDGET_SPECS = {"streambp": {"activations": [{"name": "streambp", "chunk_size": 64}]}}
"""On CPU, SDPA with a chunk mask keeps (chunk × sequence) fp32 scores, so long sequences want small chunks."""
LONG_METHODS = ["baseline", "ckpt+chunked_ce", "streambp"]
PAPER_RATIO = "2.8–5.5×"
WTA_PAPER = "up to 2.7× lower peak memory, accuracy within ~1 point (T5/BERT + LoRA, budget 0.3)"


def _recipe(opts: BenchOptions, method: str, seq: int, steps: int) -> dict[str, Any]:
    recipe = workload("pretrain", opts.data_dir, steps=steps, batch_size=1, measure_steps=2, eval_every=0,
                      eval_batches=1, warmup_steps=0, log_every=steps)
    recipe["name"] = f"activations-{method}-{seq}"
    recipe["model"] = {"preset": PRESET}
    recipe["data"]["block_size"] = seq
    recipe.update(METHODS[method])
    return recipe


def sweep(opts: BenchOptions, seqs: list[int], steps: int) -> list[dict]:
    rows = []
    for seq in seqs:
        for method in METHODS:
            if not opts.wants(method):
                continue
            if method.startswith("offload") and seq != seqs[0]:
                continue  # a no-op on CPU: one row shows it
            if seq > 1024 and method not in LONG_METHODS:
                continue
            row = train_row(_recipe(opts, method, seq, steps), method, opts, workload=f"pretrain/{PRESET}")
            row["seq"] = seq
            rows.append(row)
    return rows


# --- the budget search ------------------------------------------------------------------------------------


def _peak(method: str, seq: int) -> int:
    """Measured tensor peak of one forward+backward (no optimizer) of `method` at `seq` tokens, batch 1."""
    from memfit.memory.measure import MemoryMeter
    from memfit.memory.spec import RunSpec
    from memfit.models import build_llama
    from memfit.techniques.base import Context
    from memfit.techniques.registry import build_technique
    from memfit.train.build import apply_techniques, wrap_forward_backward

    model = build_llama(PRESET, VOCAB, max_position_embeddings=max(seq, 2048))
    model.train()
    techs = [build_technique("activations", s) for s in _spec_of(method)]
    ctx = Context(model=model, spec=RunSpec.from_model(model, batch=1, seq=seq), techniques=techs)
    apply_techniques(ctx)
    fb = wrap_forward_backward(ctx)
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seq))
    meter = MemoryMeter(model)
    with meter.region():
        fb(model, {"input_ids": ids, "labels": ids}, 1.0)
    return meter.report().peak.total


def _spec_of(method: str) -> list[dict]:
    return BUDGET_SPECS.get(method, METHODS[method]).get("activations", [])


def _estimated_peak(method: str, seq: int) -> int:
    """`step_peak` of forward+backward (no optimizer) under the method's techniques."""
    from memfit.memory.estimate import estimate_step
    from memfit.memory.spec import RunSpec
    from memfit.models import build_llama
    from memfit.techniques.registry import build_technique

    model = build_llama(PRESET, VOCAB)
    techs = [build_technique("activations", s) for s in _spec_of(method)]
    return estimate_step(RunSpec.from_model(model, batch=1, seq=seq), techs)[1]


def longest_fitting(method: str, budget: int, cap: int, tries: int = 3) -> dict:
    """The estimate picks the candidate (largest multiple of 64 whose estimated peak fits); the measured peak
    decides: step down 10 % while it exceeds the budget."""
    lo, hi = 64, cap + 64
    while hi - lo > 64:
        mid = (lo + hi) // 2 // 64 * 64
        lo, hi = (mid, hi) if _estimated_peak(method, mid) <= budget else (lo, mid)
    seq = lo
    peak = _peak(method, seq)
    for _ in range(tries):
        if peak <= budget or seq <= 64:
            break
        seq = max(64, int(seq * 0.9) // 64 * 64)
        peak = _peak(method, seq)
    return {"method": method, "longest_seq": seq, "measured_peak": peak, "estimated_peak":
            _estimated_peak(method, seq), "budget": budget, "fits": peak <= budget, "capped": seq >= cap}


def budget_rows(opts: BenchOptions, cap: int) -> list[dict]:
    budget = _peak("baseline", 512)
    rows = []
    for method in BUDGET_METHODS:
        if opts.wants(method):
            rows.append(longest_fitting(method, budget, cap))
    by = {r["method"]: r["longest_seq"] for r in rows}
    for ref in ("checkpointing", "ckpt+chunked_ce"):
        if "streambp" in by and ref in by:
            rows.append({"method": f"streambp / {ref}", "longest_seq_ratio": round(by["streambp"] / by[ref], 2),
                         "paper": PAPER_RATIO})
    return rows


def wta_gradient_rows(draws: int, seq: int = 256) -> list[dict]:
    """WTA-CRS's weight-gradient estimate against exact backprop on the sweep's model: the relative error of one
    draw and of the mean of `draws` draws (an unbiased estimate's mean error falls as 1/√draws)."""
    from memfit.models import build_llama
    from memfit.memory.spec import RunSpec
    from memfit.techniques.base import Context
    from memfit.techniques.registry import build_technique
    from memfit.train.build import apply_techniques, wrap_forward_backward

    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}

    def grads(model, fb) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        fb(model, batch, 1.0)
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "layers" in n and p.ndim == 2])

    exact_model = build_llama(PRESET, VOCAB)
    exact = grads(exact_model, wrap_forward_backward(Context(model=exact_model, spec=RunSpec.from_model(exact_model))))
    rows = []
    for budget in (0.1, 0.3):
        model = build_llama(PRESET, VOCAB)
        ctx = Context(model=model, spec=RunSpec.from_model(model, batch=1, seq=seq),
                      techniques=[build_technique("activations", {"name": "wta_crs", "budget": budget})])
        apply_techniques(ctx)
        fb = wrap_forward_backward(ctx)
        total, first = torch.zeros_like(exact), None
        for _ in range(draws):
            g = grads(model, fb)
            first = g if first is None else first
            total += g
        rel = lambda g: round(float((g - exact).norm() / exact.norm()), 4)  # noqa: E731
        rows.append({"method": f"wta_crs({budget}) gradient", "seq": seq, "draws": draws,
                     "rel_err_one_draw": rel(first), f"rel_err_mean_of_{draws}": rel(total / draws)})
    return rows


def run(opts: BenchOptions) -> list[dict]:
    t0 = time.perf_counter()
    seqs = [256, 1024] if opts.quick else [256, 1024, 4096]
    rows = [{"part": "budget", **r} for r in budget_rows(opts, cap=4096 if opts.quick else 8192)]
    rows += [{"part": "sweep", **r} for r in sweep(opts, seqs, steps=3)]
    if opts.wants("wta_crs(0.3)"):
        rows += [{"part": "wta-gradient", **r, "paper": WTA_PAPER} for r in wta_gradient_rows(16 if opts.quick else 64)]
    rows.append({"part": "meta", "seconds": round(time.perf_counter() - t0, 1), "model": PRESET, "batch": 1})
    return rows
