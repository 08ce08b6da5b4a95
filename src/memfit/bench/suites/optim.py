"""`memfit bench optim`: optimizer-state reduction methods side by side (issue 3).

Three row sets, all in one process:
1. `pretrain` — every optimizer, with and without layer-wise updates, through the real run loop on the pretrain
   recipe's corpus, tokenizer and schedule: held-out perplexity, optimizer-state bytes (measured and estimated),
   memory by category (at the tensor peak and each category's own max), tokens/s. The full llama-20m recipe runs at
   ~1,200 tokens/s on 2 cores, too slow for 22 rows, so this suite trains a 4-layer, 256-wide Llama (7.4 M
   parameters, 3.2 M of them in the projected block matrices) for 200 steps of 8 x 128 tokens — long enough for
   perplexities to separate; `--quick` trains the 1 M preset for 4 steps.
2. `reference` — a direct loop on the same model and batches: memfit GaLore vs `galore-torch` GaLoreAdamW and memfit
   APOLLO vs `apollo-torch` APOLLOAdamW (optimizer bytes as MemTracker sees them, step time, ratios), plus the
   projector refresh time of exact vs randomized SVD.
3. `finetune-cls` — MiniLM-L6 on SST-2 with a few optimizers (dev accuracy, state bytes).

Learning rates follow each paper's recipe for small Llamas (GaLore/APOLLO: 1e-2 with their scale factors; the Adam
family: the pretrain recipe's 2e-3); the rank is a quarter of the width, as in those papers.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from memfit.bench.harness import BenchOptions, record_partial, train_row
from memfit.bench.workloads import workload

PRETRAIN_PRESET = "llama-20m"
BENCH_MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4}
QUICK_PRESET = "llama-1m"


NO_LAYERWISE = ("q_galore",)
"""Methods that already update inside backward (refuse `layerwise: true`)."""
PAPER = {"q_galore": {"paper": "Q-GaLore: LLaMA-7B pre-training in 16 GB; ~50% less memory than GaLore at "
                               "comparable perplexity"}}


def _pretrain_methods(rank: int, gap: int) -> dict[str, dict[str, Any]]:
    lowrank = {"rank": rank, "update_proj_gap": gap}
    galore = {"lr": 1e-2, "scale": 0.25, **lowrank}
    return {
        "adamw": {"name": "adamw", "lr": 2e-3},
        # control: the low-rank methods' papers run at 1e-2, and their AdamW fallback (embedding, head, norms)
        # then trains at 1e-2 too; this row separates the learning rate from the method
        "adamw_lr1e-2": {"name": "adamw", "lr": 1e-2},
        "adamw_8bit": {"name": "adamw_8bit", "lr": 2e-3},
        "adam_mini": {"name": "adam_mini", "lr": 2e-3},
        "galore": {"name": "galore", **galore},
        "galore_rsvd": {"name": "galore", "svd": "randomized", **galore},
        "galore_8bit": {"name": "galore_8bit", **galore},
        "q_galore": {"name": "q_galore", **galore},
        "natural_galore": {"name": "natural_galore", "history": 4, **galore},
        "apollo": {"name": "apollo", "lr": 1e-2, "scale": 1.0, **lowrank},
        "apollo_mini": {"name": "apollo_mini", "lr": 1e-2, "update_proj_gap": gap},
        "frugal": {"name": "frugal", "lr": 2e-3, **lowrank},
        "scale": {"name": "scale", "lr": 1e-2},
    }


def _error_row(opts: BenchOptions, workload_name: str, method: str, exc: Exception) -> dict[str, Any]:
    row = {"workload": workload_name, "method": method, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    record_partial(opts, row)
    return row


def pretrain_rows(opts: BenchOptions) -> list[dict]:
    steps, batch = (4, 4) if opts.quick else (200, 8)
    rows = []
    adamw_state = None
    for method, optimizer in _pretrain_methods(rank=16 if opts.quick else 64, gap=10 if opts.quick else 50).items():
        for layerwise in (False, True):
            label = method + ("+layerwise" if layerwise else "")
            if not (opts.wants(method) or opts.wants(label)) or (layerwise and method in NO_LAYERWISE):
                continue
            recipe = workload("pretrain", opts.data_dir, steps=steps, batch_size=batch,
                              warmup_steps=2 if opts.quick else 20, measure_steps=2, eval_every=0,
                              eval_batches=4 if opts.quick else 40, num_threads=1)
            recipe["model"] = ({"preset": QUICK_PRESET} if opts.quick else
                               {"preset": PRETRAIN_PRESET, "overrides": BENCH_MODEL})
            recipe["data"]["block_size"] = 128
            recipe["optimizer"] = {**optimizer, "layerwise": layerwise}
            try:
                row = train_row(recipe, label, opts, workload="pretrain")
            except Exception as exc:  # noqa: BLE001 - a failing method must not hide the other rows
                rows.append(_error_row(opts, "pretrain", label, exc))
                continue
            row.update(PAPER.get(label, {}))
            if label == "adamw":
                adamw_state = row["optimizer_state"]
            if adamw_state:
                row["state_vs_adamw"] = round(row["optimizer_state"] / adamw_state, 3)
            rows.append(row)
    return rows


def _llama(quick: bool, vocab: int = 8192):
    from memfit.models import build_llama

    return build_llama(QUICK_PRESET, vocab, seed=0) if quick else build_llama(PRETRAIN_PRESET, vocab, seed=0,
                                                                               **BENCH_MODEL)


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
    steps, rank, gap = (4, 32, 2) if opts.quick else (12, 64, 4)
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
        model = _llama(opts.quick)
        opt = ours(model)
        s_ours, b_ours = _time_steps(model, opt, data)
        model = _llama(opts.quick)
        s_ref, b_ref = _time_steps(model, theirs(model), data)
        rows.append({"workload": "reference", "method": f"memfit {name} vs {name}-torch", "rank": rank,
                     "update_proj_gap": gap, "memfit_optimizer": b_ours, "reference_optimizer": b_ref,
                     "memory_ratio": round(b_ours / b_ref, 4), "memfit_step_s": round(s_ours, 4),
                     "reference_step_s": round(s_ref, 4), "speed_ratio": round(s_ref / s_ours, 3),
                     "refresh_ms": round(1e3 * opt.refresh_timer.seconds / max(1, opt.refresh_timer.count), 2)})
    # projector refresh: exact vs randomized SVD on every projected matrix of the pretrain model
    model = _llama(opts.quick)
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
    steps = 3 if opts.quick else 150  # the fewer-params suite's full setting
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
                          measure_steps=1, eval_every=0, eval_batches=8 if opts.quick else 55, num_threads=1)
        recipe["optimizer"] = optimizer
        try:
            rows.append(train_row(recipe, method, opts, workload="finetune-cls"))
        except Exception as exc:  # noqa: BLE001
            rows.append(_error_row(opts, "finetune-cls", method, exc))
    return rows


def run(opts: BenchOptions) -> list[dict]:
    return reference_rows(opts) + pretrain_rows(opts) + finetune_rows(opts)
