"""`memfit bench optim`: optimizer-state reduction methods side by side (issue 3).

Three row sets, all in one process:
1. `pretrain` — every optimizer, with and without layer-wise updates, through the real run loop: validation
   perplexity, optimizer-state bytes, memory by category (at the total peak and each category's own max), tokens/s.
   On the shared 2-core machine the standard llama-20m workload runs at ~170 tokens/s, so this suite trains the
   same recipe (corpus, tokenizer, schedule) with a smaller preset and few steps; `--quick` shrinks it further.
2. `reference` — a direct loop on the same model and batches: memfit GaLore vs `galore-torch` GaLoreAdamW and memfit
   APOLLO vs `apollo-torch` APOLLOAdamW (optimizer bytes as MemTracker sees them, step time, ratios), plus the
   projector refresh time of exact vs randomized SVD.
3. `finetune-cls` — MiniLM-L6 on SST-2 with a few optimizers (dev accuracy, state bytes).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from memfit.bench.harness import BenchOptions
from memfit.bench.workloads import workload

PRETRAIN_PRESET = "llama-1m"


def _pretrain_methods(rank: int, gap: int) -> dict[str, dict[str, Any]]:
    lowrank = {"rank": rank, "update_proj_gap": gap}
    return {
        "adamw": {"name": "adamw", "lr": 2e-3},
        "adamw_8bit": {"name": "adamw_8bit", "lr": 2e-3},
        "adam_mini": {"name": "adam_mini", "lr": 2e-3},
        "galore": {"name": "galore", "lr": 2e-3, **lowrank},
        "galore_rsvd": {"name": "galore", "lr": 2e-3, "svd": "randomized", **lowrank},
        "galore_8bit": {"name": "galore_8bit", "lr": 2e-3, **lowrank},
        "natural_galore": {"name": "natural_galore", "lr": 2e-3, "history": 4, **lowrank},
        "apollo": {"name": "apollo", "lr": 2e-3, **lowrank},
        "apollo_mini": {"name": "apollo_mini", "lr": 2e-3, "update_proj_gap": gap},
        "frugal": {"name": "frugal", "lr": 2e-3, **lowrank},
        "scale": {"name": "scale", "lr": 1e-2},
    }


def _row(recipe: dict[str, Any], method: str, workload_name: str, **extra: Any) -> dict[str, Any]:
    from memfit.recipe import load_recipe
    from memfit.train import train

    rec = load_recipe(recipe)
    t0 = time.perf_counter()
    result = train(rec, quiet=True)
    row: dict[str, Any] = {"workload": workload_name, "method": method, **result.metrics,
                           "steps": rec.train.steps, "tokens_per_s": round(result.tokens_per_s, 1),
                           "wall_s": round(time.perf_counter() - t0, 1), "optimizer_state": result.optimizer_state_bytes,
                           "estimate_optimizer": result.estimate.optimizer}
    if result.memory is not None:
        for cat in ("parameters", "gradients", "optimizer", "activations", "temporaries"):
            row[f"peak_{cat}"] = getattr(result.memory.peak, cat)
        row["peak_total"] = result.memory.peak.total
        row["max_gradients"] = result.memory.category_peaks.gradients
        row["max_optimizer"] = result.memory.category_peaks.optimizer
        row["process_peak"] = result.memory.process_peak
    row.update(extra)
    return row


def pretrain_rows(opts: BenchOptions) -> list[dict]:
    steps = 4 if opts.quick else 30
    rows = []
    for method, optimizer in _pretrain_methods(rank=32, gap=10).items():
        for layerwise in (False, True):
            label = method + ("+layerwise" if layerwise else "")
            if not (opts.wants(method) or opts.wants(label)):
                continue
            recipe = workload("pretrain", opts.data_dir, steps=steps, batch_size=4, warmup_steps=3, measure_steps=2,
                              eval_every=0, eval_batches=4 if opts.quick else 16, num_threads=1)
            recipe["model"] = {"preset": PRETRAIN_PRESET}
            recipe["data"]["block_size"] = 128
            recipe["optimizer"] = {**optimizer, "layerwise": layerwise}
            try:
                rows.append(_row(recipe, label, "pretrain"))
            except Exception as exc:  # a failing method must not hide the other rows
                rows.append({"workload": "pretrain", "method": label, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def _llama(vocab: int = 8192):
    from memfit.models import build_llama

    return build_llama(PRETRAIN_PRESET, vocab, seed=0)


def _time_steps(model, opt, data) -> tuple[float, int]:
    """Seconds per step over `data` (after one warm-up step) and the optimizer bytes MemTracker sees."""
    from memfit.memory.measure import MemoryMeter

    def one(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one(data[0])
    t0 = time.perf_counter()
    for ids in data[1:-1]:
        one(ids)
    seconds = (time.perf_counter() - t0) / max(1, len(data) - 2)
    meter = MemoryMeter(model, opt)
    with meter.region():
        one(data[-1])
    return seconds, meter.current().optimizer


def reference_rows(opts: BenchOptions) -> list[dict]:
    from memfit.optim.apollo import APOLLOAdamW
    from memfit.optim.common import split_groups
    from memfit.optim.galore import GaLoreAdamW

    torch.set_num_threads(1)
    steps, rank, gap = (4, 32, 2) if opts.quick else (12, 32, 4)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 8192, (4, 128), generator=gen) for _ in range(steps)]

    def ref_groups(model, extra):
        groups = []
        for g in split_groups(model, 0.0):
            d = {"params": g["params"]}
            if g["project"]:
                d.update(rank=rank, update_proj_gap=gap, proj_type="std", **extra)
            groups.append(d)
        return groups

    pairs = []
    try:
        import galore_torch

        pairs.append(("galore", lambda m: GaLoreAdamW(split_groups(m, 0.0), rank=rank, update_proj_gap=gap),
                      lambda m: galore_torch.GaLoreAdamW(ref_groups(m, {"scale": 0.25}), no_deprecation_warning=True)))
    except ImportError:
        pass
    try:
        import apollo_torch

        pairs.append(("apollo", lambda m: APOLLOAdamW(split_groups(m, 0.0), rank=rank, update_proj_gap=gap),
                      lambda m: apollo_torch.APOLLOAdamW(ref_groups(m, {"scale": 1.0, "proj": "random",
                                                                          "scale_type": "channel"}))))
    except ImportError:
        pass
    rows = []
    for name, ours, theirs in pairs:
        model = _llama()
        opt = ours(model)
        s_ours, b_ours = _time_steps(model, opt, data)
        model = _llama()
        s_ref, b_ref = _time_steps(model, theirs(model), data)
        rows.append({"workload": "reference", "method": f"memfit {name} vs {name}-torch", "rank": rank,
                     "update_proj_gap": gap, "memfit_optimizer": b_ours, "reference_optimizer": b_ref,
                     "memory_ratio": round(b_ours / b_ref, 4), "memfit_step_s": round(s_ours, 4),
                     "reference_step_s": round(s_ref, 4), "speed_ratio": round(s_ref / s_ours, 3),
                     "refresh_ms": round(1e3 * opt.refresh_timer.seconds / max(1, opt.refresh_timer.count), 2)})
    # projector refresh: exact vs randomized SVD on every projected matrix of the pretrain model
    model = _llama()
    model(input_ids=data[0], labels=data[0]).loss.backward()
    for svd in ("exact", "randomized"):
        opt = GaLoreAdamW(split_groups(model, 0.0), rank=rank, update_proj_gap=1, svd=svd, lr=0.0)
        for _ in range(3):
            opt.step()
        rows.append({"workload": "reference", "method": f"projector refresh ({svd} SVD)", "rank": rank,
                     "refresh_ms": round(1e3 * opt.refresh_timer.seconds / opt.refresh_timer.count, 3),
                     "refreshes": opt.refresh_timer.count})
    return rows


def finetune_rows(opts: BenchOptions) -> list[dict]:
    steps = 3 if opts.quick else 20
    methods = {
        "adamw": {"name": "adamw", "lr": 1e-4},
        "galore": {"name": "galore", "lr": 1e-4, "rank": 64, "update_proj_gap": 10, "scale": 2.0},
        "apollo_mini": {"name": "apollo_mini", "lr": 1e-4, "update_proj_gap": 10},
        "adam_mini": {"name": "adam_mini", "lr": 1e-4},
        "adamw_8bit": {"name": "adamw_8bit", "lr": 1e-4},
    }
    rows = []
    for method, optimizer in methods.items():
        if not opts.wants(method):
            continue
        recipe = workload("finetune-cls", opts.data_dir, steps=steps, batch_size=16, warmup_steps=2,
                          measure_steps=1, eval_every=0, eval_batches=8 if opts.quick else 28, num_threads=1)
        recipe["optimizer"] = optimizer
        try:
            rows.append(_row(recipe, method, "finetune-cls"))
        except Exception as exc:
            rows.append({"workload": "finetune-cls", "method": method, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def run(opts: BenchOptions) -> list[dict]:
    return reference_rows(opts) + pretrain_rows(opts) + finetune_rows(opts)
