"""The run loop: explicit and short (nanoGPT / torchtune spirit). Everything a technique changes reaches it
through `build_run`; the loop only schedules the LR, steps, evaluates, logs, checkpoints and measures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from memfit.errors import CheckpointError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.estimate import estimate_step
from memfit.memory.measure import MemoryMeter, MemoryReport, state_bytes
from memfit.recipe import Recipe
from memfit.train import checkpoint as ckpt
from memfit.train.build import BuiltRun, build_run
from memfit.train.data_order import BatchStream
from memfit.train.evaluate import evaluate
from memfit.train.schedule import lr_multiplier, set_lr
from memfit.train.step import autocast_for


@dataclass
class RunResult:
    metrics: dict[str, float]  # final evaluation
    history: list[dict[str, Any]]
    memory: MemoryReport | None
    estimate: MemoryBreakdown
    tokens_per_s: float
    run_dir: Path | None
    trainable_params: int = 0
    total_params: int = 0
    optimizer_state_bytes: int = 0
    estimate_peak: int = 0  # predicted tensor peak of a step (`step_peak`); `estimate.total` is an upper bound
    extras: dict[str, Any] = field(default_factory=dict)


def _count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def train(recipe: Recipe, run_dir: Path | str | None = None, resume: bool = False,
          console: Console | None = None, quiet: bool = False) -> RunResult:
    """Run a recipe end to end; with `run_dir`, write recipe, metrics.jsonl, checkpoints and the memory report."""
    console = console or Console(quiet=quiet)
    run_dir = Path(run_dir) if run_dir is not None else None
    built = build_run(recipe)
    ctx, cfg = built.ctx, recipe.train
    train_stream = BatchStream(built.data.train, cfg.batch_size, built.data.collate, seed=recipe.seed)
    eval_stream = (BatchStream(built.data.eval, cfg.batch_size, built.data.collate, drop_last=False)
                   if built.data.eval is not None and len(built.data.eval) else None)
    multiplier = lr_multiplier(cfg.schedule, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction)
    estimate, estimate_peak = estimate_step(built.spec, built.techniques)

    start_step, history = 0, []
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        if resume:
            start_step, history = _resume(run_dir, built)
        elif ckpt.latest_checkpoint(run_dir) is not None:
            raise CheckpointError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                                  f"another output directory")
    set_lr(ctx.optimizer, multiplier(start_step))  # records each group's base LR before the first step

    meter = MemoryMeter(ctx.model, ctx.optimizer, device=built.device) if cfg.measure_steps else None
    measured_left = cfg.measure_steps
    train_time, train_tokens = 0.0, 0
    metrics_file = (run_dir / "metrics.jsonl").open("a") if run_dir is not None else None
    autocast = (lambda: autocast_for(built.device, cfg.precision))
    try:
        with _progress(console, quiet) as progress:
            task = progress.add_task(recipe.name, total=cfg.steps, completed=start_step, loss=float("nan"))
            for step in range(start_step, cfg.steps):
                ctx.step = step
                lr = set_lr(ctx.optimizer, multiplier(step))
                batches = [_to(train_stream.shuffled(step * cfg.grad_accum + i), built.device)
                           for i in range(cfg.grad_accum)]
                for t in built.techniques:
                    t.on_step_start(ctx)
                t0 = time.perf_counter()
                if meter is not None and measured_left > 0:
                    with meter.region():
                        loss = built.train_step(batches)
                    measured_left -= 1
                else:
                    loss = built.train_step(batches)
                    train_time += time.perf_counter() - t0
                    train_tokens += sum(_count_tokens(b) for b in batches)
                record: dict[str, Any] = {"step": step + 1, "loss": loss, "lr": lr}
                for t in built.techniques:
                    t.on_step_end(ctx, record)
                if eval_stream is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 \
                        and step + 1 < cfg.steps:
                    record.update(evaluate(ctx.model, eval_stream, recipe.task, built.device,
                                           built.data.label_names, cfg.eval_batches, autocast))
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or len(record) > 3:
                    history.append(record)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                progress.update(task, advance=1, loss=loss)
                if run_dir is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 \
                        and step + 1 < cfg.steps:
                    _save(run_dir, built, step + 1, history)
    finally:
        if metrics_file is not None:
            metrics_file.close()

    final = evaluate(ctx.model, eval_stream, recipe.task, built.device, built.data.label_names,
                     cfg.eval_batches, autocast) if eval_stream is not None else {}
    tokens_per_s = train_tokens / train_time if train_time > 0 else 0.0
    if history:
        history[-1].update(final)
    report = meter.report(spec=f"batch={built.spec.batch} seq={built.spec.seq}") if meter is not None \
        and cfg.measure_steps and measured_left < cfg.measure_steps else None
    n_total = sum(p.numel() for p in ctx.model.parameters())
    n_train = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
    result = RunResult(metrics=final, history=history, memory=report, estimate=estimate, tokens_per_s=tokens_per_s,
                       run_dir=run_dir, trainable_params=n_train, total_params=n_total,
                       optimizer_state_bytes=state_bytes(ctx.optimizer),
                       estimate_peak=estimate_peak)
    if run_dir is not None:
        if metrics_file is not None and final:
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": cfg.steps, "final": True, **final}) + "\n")
        _save(run_dir, built, cfg.steps, history)
        _export(run_dir, built)
        write_summary(run_dir, result)
    return result


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _save(run_dir: Path, built: BuiltRun, step: int, history: list) -> None:
    state = {t.name: t.state_dict() for t in built.techniques}
    ckpt.save_checkpoint(run_dir, step, built.model, built.ctx.optimizer, state,
                         {"recipe": built.recipe.name, "history_len": len(history)})


def _resume(run_dir: Path, built: BuiltRun) -> tuple[int, list]:
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"--resume: {run_dir} has no checkpoint yet; run without --resume")
    loaded = ckpt.load_checkpoint(path, built.model, built.ctx.optimizer)
    for t in built.techniques:
        t.load_state_dict(loaded["techniques"].get(t.name, {}))
    step = loaded["meta"]["step"]
    history = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():  # keep what was logged up to the checkpoint, drop what came after
        history = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["step"] <= step
                   and not r.get("final")]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in history))
    return step, history


def _export(run_dir: Path, built: BuiltRun) -> None:
    """Save a loadable HF model folder (model + tokenizer) when the model is a plain transformers model."""
    model = built.model
    if hasattr(model, "save_pretrained") and type(model).__module__.startswith("transformers"):
        try:
            model.save_pretrained(run_dir / "model")
            built.data.tokenizer.save_pretrained(run_dir / "model")
        except Exception:  # techniques may leave modules transformers cannot serialise; checkpoints still exist
            pass


def write_summary(run_dir: Path, result: RunResult) -> None:
    from memfit.report import write_report

    summary = {
        "metrics": result.metrics,
        "tokens_per_s": result.tokens_per_s,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "estimate": result.estimate.to_dict(),
        "estimate_peak": result.estimate_peak,
        "measured": result.memory.to_dict() if result.memory else None,
    }
    (run_dir / "memory.json").write_text(json.dumps(summary, indent=2))
    write_report(run_dir)


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=console,
                    disable=quiet, transient=False)
