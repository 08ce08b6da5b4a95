"""A prepared GPU check (issue 18 item 6): `memfit bench cuda` (a few minutes on one GPU).

For a grid of Llama sizes × precisions × techniques, two training steps on random tokens on `cuda:0`: measured
`torch.cuda.max_memory_allocated` (tensors), `max_memory_reserved` (the caching allocator) and the device's used
memory (`mem_get_info`, context included) against memfit's predictions — `estimate_step`'s tensor peak,
`memory.runtime.cuda_reserved` and the device peak with the `runtime` category. It also measures the CUDA context
itself (used memory after `torch.cuda.init()` and a first matmul) next to `runtime.CUDA_CONTEXT`, so the
documented constants can be refined. Without CUDA it refuses with one line; `--quick` runs the smallest size.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from memfit.errors import ConfigError

SIZES = ("llama-60m", "llama-130m", "llama-350m")
PRECISIONS = ("32-true", "bf16-true")  # Lightning names (memory/precision.py): fp32, and bf16 weights as users run them
TECHNIQUES: dict[str, dict[str, Any]] = {
    "adamw": {},
    "adamw layer-wise": {"optimizer": {"name": "adamw", "layerwise": True}},
    "checkpointing": {"activations": ["checkpointing"]},
    "lora r=16": {"adapter": {"name": "lora", "r": 16}},
    "galore r=128": {"optimizer": {"name": "galore", "rank": 128}},
}
BATCH, SEQ, VOCAB, STEPS = 4, 512, 32000, 2
MiB = 2**20


def grid(quick: bool) -> list[tuple[str, str, str]]:
    sizes = SIZES[:1] if quick else SIZES
    precisions = [p for p in PRECISIONS if _recipe_takes(p)]
    return list(itertools.product(sizes, precisions, TECHNIQUES))


def _recipe_takes(precision: str) -> bool:
    from memfit.plan.planner import recipe_precisions

    return precision in recipe_precisions()


def recipe(size: str, precision: str, technique: str) -> dict[str, Any]:
    return {"name": f"cuda-{size}-{precision}-{technique}", "task": "causal_lm", "model": {"preset": size},
            "data": {"kind": "text", "paths": ["(random tokens)"], "block_size": SEQ, "vocab_size": VOCAB},
            "train": {"batch_size": BATCH, "precision": precision, "device": "cuda"},
            "optimizer": {"name": "adamw", "lr": 1e-4}, **TECHNIQUES[technique]}


def predict(rec: dict[str, Any]) -> dict[str, int]:
    """Predicted tensors / reserved / device bytes on CUDA (the paper-tables suite's prediction)."""
    from memfit.bench.suites.paper_tables import predict as predict_cuda

    return predict_cuda(rec)


def row(measured: dict[str, int], predicted: dict[str, int], **key: Any) -> dict[str, Any]:
    """One table row: measured vs predicted tensors (allocated), reserved and device, in MiB and as ratios."""
    out: dict[str, Any] = dict(key)
    for name, m_key in (("allocated", "tensors"), ("reserved", "reserved"), ("device", "device")):
        out[f"{name}_meas_mib"] = round(measured[name] / MiB, 1)
        out[f"{name}_pred_mib"] = round(predicted[m_key] / MiB, 1)
        out[f"{name}_ratio"] = round(predicted[m_key] / measured[name], 3) if measured[name] else None
    return out


def measure(rec: dict[str, Any], baseline_used: int) -> dict[str, int]:
    """Two steps of `rec` on cuda:0 with memfit's own step; peaks of allocated, reserved and device used."""
    import torch

    from memfit.models import build_llama
    from memfit.recipe import load_recipe
    from memfit.techniques.base import ESTIMATE_ORDER, Context
    from memfit.train.build import apply_techniques, build_optimizer, by_slot, run_spec, wrap_forward_backward
    from memfit.train.step import model_loss

    device = torch.device("cuda:0")
    r = load_recipe(rec)
    model = build_llama(r.model.preset, VOCAB)
    techniques = sorted(r.techniques(), key=lambda t: ESTIMATE_ORDER.index(t.slot))
    ctx = Context(model=model, spec=run_spec(r, model, device), device=device, loss_fn=model_loss,
                  grad_clip=r.train.clip_grad_norm, seed=0, techniques=techniques)
    apply_techniques(ctx)
    ctx.model.to(device).train()
    ctx.optimizer = build_optimizer(by_slot(techniques, "optimizer")[0], ctx)
    fb = wrap_forward_backward(ctx, r.train.precision)
    step = by_slot(techniques, "step")[0].make_train_step(ctx, fb)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    used_peak = 0
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(device)
        step([{"input_ids": ids, "labels": ids}])
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(device)
        used_peak = max(used_peak, total - free)
    out = {"allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device),
           # the device as nvidia-smi sees it: this process's context + its reserve (other processes subtracted)
           "device": used_peak - baseline_used}
    del ctx, model, step, fb
    torch.cuda.empty_cache()
    return out


def context_bytes() -> tuple[int, int]:
    """(device memory used before this process touched CUDA — read with NVML, else 0 —, the CUDA context's bytes:
    used after init + a first matmul, minus that, minus what the allocator reserved)."""
    try:  # before torch touches the device
        import pynvml

        pynvml.nvmlInit()
        before = int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # no NVML: everything used on the device counts as this process's
        before = 0
    import torch

    a = torch.randn(1024, 1024, device="cuda")
    (a @ a).sum().item()
    free, total = torch.cuda.mem_get_info(0)
    context = total - free - before - torch.cuda.memory_reserved(0)
    del a
    torch.cuda.empty_cache()
    return before, context


def run(opts) -> list[dict]:
    import torch

    from memfit.bench.harness import record_partial
    from memfit.memory.runtime import CUDA_CONTEXT

    if not torch.cuda.is_available():
        raise ConfigError("memfit bench cuda needs a CUDA device (torch.cuda.is_available() is False here)")
    before, context = context_bytes()
    rows: list[dict] = [{"size": "(context)", "precision": "", "technique": "",
                         "allocated_meas_mib": None, "device_meas_mib": round(context / MiB, 1),
                         "device_pred_mib": round(CUDA_CONTEXT / MiB, 1),
                         "device_ratio": round(CUDA_CONTEXT / context, 3) if context > 0 else None}]
    baseline_used = before
    for size, precision, technique in grid(opts.quick):
        if opts.only and technique not in opts.only and size not in opts.only:
            continue
        rec = recipe(size, precision, technique)
        t0 = time.perf_counter()
        try:
            got = measure(rec, baseline_used)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({"size": size, "precision": precision, "technique": technique, "error": "out of memory"})
            continue
        out = row(got, predict(rec), size=size, precision=precision, technique=technique)
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(out)
        record_partial(opts, {**out, "workload": size, "method": technique})
    return rows
