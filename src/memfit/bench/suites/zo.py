"""`memfit bench zo`: zeroth-order fine-tuning (MeZO and the ZO-Bench variants) against AdamW full fine-tuning on
finetune-cls (MiniLM-L6, SST-2).

Every method runs the same loop on the same batches: accuracy on a fixed dev subset is recorded as a curve against
forward passes and seconds; rows report accuracy after a fixed forward-pass budget and after a fixed wall-clock
budget, the first step's measured peak by category, and steps/s. Forward-pass accounting: an SPSA step is 2·n_spsa
forwards (block-wise: 2 per block), a forward-gradient step 1 dual forward, a backprop step 1 forward + 1 backward
(counted as 3 forward-equivalents, the usual 1:2 cost ratio).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from memfit.bench.harness import BenchOptions, record_partial
from memfit.bench.workloads import workload
from memfit.memory.estimate import estimate_run
from memfit.memory.measure import MemoryMeter
from memfit.recipe import load_recipe
from memfit.train.build import build_run
from memfit.train.data_order import BatchStream
from memfit.train.evaluate import evaluate

METHODS: dict[str, dict[str, Any]] = {
    "adamw-full": {"optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01}},
    "mezo-full": {"step": {"name": "mezo", "lr": 2e-5, "eps": 1e-3}},
    "zo-sign-full": {"step": {"name": "zo-sign", "lr": 2e-6, "eps": 1e-3}},
    "zo-momentum-full": {"step": {"name": "zo-momentum", "lr": 5e-6, "eps": 1e-3}},
    "zo-adam-full": {"step": {"name": "zo-adam", "lr": 2e-5, "eps": 1e-3}},
    "zo-block-full": {"step": {"name": "zo-block", "lr": 2e-5, "eps": 1e-3, "blocks_per_step": 1}},
    "forward-grad-full": {"step": {"name": "forward-grad", "lr": 2e-5}},
    "mezo-lora": {"step": {"name": "mezo", "lr": 1e-3, "eps": 1e-3}, "adapter": {"name": "lora", "r": 8}},
}


def forwards_per_step(recipe: dict) -> int:
    step = recipe.get("step")
    if not step:
        return 3
    n = step.get("n_spsa", 1)
    return {"forward-grad": n}.get(step["name"], 2 * n)


def run_method(name: str, overrides: dict, opts: BenchOptions, forward_budget: int, seconds: float,
               eval_points: int) -> dict:
    recipe = workload("finetune-cls", opts.data_dir, steps=10**6, batch_size=16, schedule="constant",
                      warmup_steps=0, measure_steps=0, eval_every=0, num_threads=torch.get_num_threads())
    recipe["data"].update({"max_length": 64, "max_train_examples": 4000 if opts.quick else 20000,
                           "max_eval_examples": 256})
    recipe.update({k: v for k, v in overrides.items()})
    if "optimizer" not in overrides:
        recipe["optimizer"] = "adamw"  # the default; a ZO step builds its own optimizer
    built = build_run(load_recipe(recipe))
    ctx, data = built.ctx, built.data
    fps = forwards_per_step(recipe)
    steps = max(1, forward_budget // fps)
    train = BatchStream(data.train, 16, data.collate, seed=0)
    dev = BatchStream(data.eval, 32, data.collate, drop_last=False)
    eval_batches = 4 if opts.quick else 8

    def acc() -> float:
        return evaluate(ctx.model, dev, "seq_cls", built.device, data.label_names, eval_batches)["accuracy"]

    curve = [(0, 0.0, acc())]
    meter = MemoryMeter(ctx.model, ctx.optimizer)
    every = max(1, steps // eval_points)
    train_time, at_time = 0.0, None
    for step in range(steps):
        batch = train.shuffled(step)
        t0 = time.perf_counter()
        if step == 0:
            with meter.region():
                built.train_step([batch])
        else:
            built.train_step([batch])
        if step > 0:  # the measured first step runs under the memory tracker: not timed
            train_time += time.perf_counter() - t0
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append(((step + 1) * fps, round(train_time, 1), acc()))
        if train_time >= seconds:  # the wall-clock budget ends the run
            if not curve or curve[-1][0] != (step + 1) * fps:
                curve.append(((step + 1) * fps, round(train_time, 1), acc()))
            at_time = curve[-1]
            steps = step + 1
            break
    report = meter.report()
    owns = any(getattr(t, "owns_optimizer", False) for t in built.techniques)
    est = estimate_run(built.spec, [t for t in built.techniques if not (owns and t.slot == "optimizer")])
    row: dict[str, Any] = {
        "method": name, "steps": steps, "forwards": steps * fps,
        "acc_start": round(curve[0][2], 4), "acc_end": round(curve[-1][2], 4), "train_s": round(train_time, 1),
        f"acc@{forward_budget}fwd": round(curve[-1][2], 4) if at_time is None else None,
        f"acc@{seconds:.0f}s": round(at_time[2], 4) if at_time is not None else None,
        "steps_per_s": round((steps - 1) / train_time, 2) if train_time else None,
        "trainable_params": sum(p.numel() for p in ctx.model.parameters() if p.requires_grad),
        "peak_total": report.peak.total,
        **{f"peak_{c}": getattr(report.peak, c) for c in ("parameters", "gradients", "optimizer", "activations")},
        "estimate_total": est.total,
        "curve": " ".join(f"{f}:{a:.3f}" for f, _, a in curve),
    }
    return row


ZO2_PAPER = "ZO2: OPT-175B fine-tuned with MeZO in 18 GB of GPU memory, no accuracy loss, little added time"


def zo2_rows(opts: BenchOptions, preset: str = "llama-20m", vocab: int = 8192) -> list[dict]:
    """ZO2 (blocks streamed from a memory-mapped file) next to in-memory MeZO on the same model, seed and batches:
    the losses (identical by construction, checked), the measured tensor peak against the model's parameter
    bytes, and seconds per step."""
    import tempfile

    from memfit.memory.spec import RunSpec
    from memfit.models import build_llama
    from memfit.techniques.base import Context
    from memfit.techniques.registry import build_technique
    from memfit.train.build import apply_techniques, wrap_forward_backward

    steps = 4 if opts.quick else 20
    out, losses = [], {}
    for name in ("mezo", "zo2"):
        model = build_llama(preset, vocab, seed=0)
        model.train()
        spec = RunSpec.from_model(model, batch=2, seq=128)
        options = {"name": name, "lr": 1e-6, "eps": 1e-3}
        if name == "zo2":
            options["offload_dir"] = tempfile.mkdtemp(prefix="memfit-bench-zo2-")
        tech = build_technique("step", options)
        ctx = Context(model=model, spec=spec, techniques=[tech], seed=0)
        apply_techniques(ctx)
        step = tech.make_train_step(ctx, wrap_forward_backward(ctx))
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, vocab, (2, 128), generator=gen) for _ in range(steps)]
        meter = MemoryMeter(model, ctx.optimizer)
        with meter.region():
            run_losses = [step([{"input_ids": batches[0], "labels": batches[0]}])]
        t0 = time.perf_counter()
        run_losses += [step([{"input_ids": b, "labels": b}]) for b in batches[1:]]
        seconds = (time.perf_counter() - t0) / max(steps - 1, 1)
        report = meter.report()
        losses[name] = run_losses
        est = estimate_run(spec, [tech])
        out.append({"method": f"{name} ({preset})", "steps": steps, "loss_end": round(run_losses[-1], 6),
                    "model_param_bytes": sum(p.nbytes for p in spec.model.params),
                    "peak_total": report.peak.total, "peak_parameters": report.category_peaks.parameters,
                    "peak_activations": report.category_peaks.activations, "estimate_total": est.total,
                    "s_per_step": round(seconds, 3)})
    out[1]["losses_identical_to_mezo"] = losses["zo2"] == losses["mezo"]
    out[1]["speed_vs_mezo"] = round(out[0]["s_per_step"] / out[1]["s_per_step"], 3)
    out[1]["peak_vs_mezo"] = round(out[1]["peak_total"] / out[0]["peak_total"], 3)
    out[1]["paper"] = ZO2_PAPER
    return out


def run(opts: BenchOptions) -> list[dict]:
    forward_budget = 24 if opts.quick else 200
    seconds = 15.0 if opts.quick else 75.0
    rows = []
    for name, overrides in METHODS.items():
        if opts.wants(name):
            rows.append(run_method(name, overrides, opts, forward_budget, seconds, eval_points=4))
            record_partial(opts, rows[-1])
    if opts.wants("zo2"):
        rows += zo2_rows(opts)
    base = next((r for r in rows if r["method"] == "adamw-full"), None)
    for r in rows:
        if base and "peak_total" in r:
            r["peak_vs_adamw"] = round(r["peak_total"] / base["peak_total"], 3)
    return rows
