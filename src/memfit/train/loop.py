"""The run loop: explicit and short (nanoGPT / torchtune spirit). Everything a technique changes reaches it
through `build_run`; the loop only schedules the LR, steps, evaluates, logs, checkpoints and measures."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from memfit import rundir
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.estimate import estimate_step
from memfit.memory.sharding import estimate_rank
from memfit.memory.runtime import with_runtime
from memfit.memory.measure import MemoryMeter, MemoryReport, state_bytes
from memfit.optim import offload
from memfit.progress import Ticker, note
from memfit.recipe import Recipe
import memfit.train.checkpoint as ckpt
from memfit.train import parallel
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


GRAD_SCALER_KEY = "amp.grad_scaler"
"""Where a checkpoint keeps the 16-mixed loss scaler's state (beside the techniques' states)."""


def _count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@dataclass
class _LoopState:
    """What the loop carries from step to step."""

    train_stream: BatchStream
    eval_stream: BatchStream | None
    multiplier: Callable[[int], float]
    meter: MemoryMeter | None
    measured_left: int
    start_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_time: float = 0.0  # seconds of unmeasured steps (the tracker slows measured ones down)
    train_tokens: int = 0
    compile_s: float | None = None  # train.compile: seconds of the first compiled step (compiles; not timed)

    @classmethod
    def new(cls, built: BuiltRun) -> _LoopState:
        cfg = built.recipe.train
        data = built.data
        eval_stream = (BatchStream(data.eval, cfg.batch_size, data.collate, drop_last=False)
                       if data.eval is not None and len(data.eval) else None)
        meter = None
        if cfg.measure_steps:
            meter = (parallel.meter(built.ctx.model, built.ctx.optimizer, built.par) if built.par is not None
                     else MemoryMeter(built.ctx.model, built.ctx.optimizer, device=built.device))
        return cls(train_stream=BatchStream(data.train, cfg.batch_size, data.collate, seed=built.recipe.seed),
                   eval_stream=eval_stream,
                   multiplier=lr_multiplier(cfg.schedule, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio,
                                            cfg.decay_fraction),
                   meter=meter, measured_left=cfg.measure_steps)


def train(recipe: Recipe, run_dir: Path | str | None = None, resume: bool = False,
          console: Console | None = None, quiet: bool = False, overwrite: bool = False) -> RunResult:
    """Run a recipe end to end; with `run_dir`, write recipe, metrics.jsonl, checkpoints and the memory report.

    `resume` continues the run in `run_dir` from its newest intact checkpoint; `overwrite` replaces the run there
    (only the files memfit wrote). A folder memfit did not write is never used (`memfit.rundir`)."""
    run_dir = Path(run_dir) if run_dir is not None else None
    par = parallel.start(recipe.train.device)  # None unless started by torchrun (`memfit train --nproc N`)
    if par is not None:
        parallel.check(recipe, par)
        quiet = quiet or not par.is_main
    if run_dir is not None:  # before the (possibly long) build, and before anything is written
        rundir.check(run_dir, resume=resume, overwrite=overwrite, has_checkpoint=ckpt.has_checkpoint(run_dir))
        if par is not None:
            par.barrier()  # every rank checked before rank 0 creates anything
    built = build_run(recipe, par=par)
    offload.use_run_dir(built.ctx.optimizer, run_dir)  # optimizer.offload: disk keeps its files in the run dir
    if par is None:
        estimate, estimate_peak = estimate_step(built.spec, built.techniques)
    else:  # what each rank holds and peaks at
        rank = estimate_rank(built.spec, built.techniques, par.world, recipe.distributed.reshard_after_forward)
        estimate, estimate_peak = rank.breakdown, rank.peak
    estimate, _ = with_runtime(estimate, estimate_peak, built.spec, built.techniques)
    state = _LoopState.new(built)
    if run_dir is not None:
        _open_run_dir(run_dir, built, state, resume)
    set_lr(built.ctx.optimizer, state.multiplier(state.start_step))  # records each group's base LR first
    _run_steps(built, state, run_dir, console or Console(quiet=quiet), quiet)
    final = _evaluate(built, state, "final evaluation")
    result = _result(built, state, final, estimate, estimate_peak, run_dir)
    if run_dir is not None:
        _finish_run_dir(run_dir, built, result)
    offload.close(built.ctx.optimizer)
    return result


def _open_run_dir(run_dir: Path, built: BuiltRun, state: _LoopState, resume: bool) -> None:
    if _main(built):
        rundir.create(run_dir, built.recipe.name, fresh=not resume)
        rundir.write_text_atomic(run_dir / "recipe.yaml",
                                 yaml.safe_dump(built.recipe.model_dump(mode="json"), sort_keys=False))
    if built.par is not None:
        built.par.barrier()
    if resume:
        state.start_step, state.history = _resume(run_dir, built)


def _run_steps(built: BuiltRun, state: _LoopState, run_dir: Path | None, console: Console, quiet: bool) -> None:
    cfg = built.recipe.train
    metrics = run_dir / rundir.METRICS if run_dir is not None and _main(built) else None
    with _StepProgress(built.recipe.name, cfg.steps, state.start_step, console, quiet) as progress:
        for step in range(state.start_step, cfg.steps):
            record = _train_step(built, state, step)
            last = step + 1 == cfg.steps
            if state.eval_stream is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
                record.update(_evaluate(built, state, f"evaluation at step {step + 1}"))
            if (step + 1) % cfg.log_every == 0 or last or len(record) > 3:
                state.history.append(record)
                if metrics is not None:
                    rundir.append_line(metrics, json.dumps(record))
                progress.log(record)
            progress.advance(record["loss"])
            if run_dir is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
                _save(run_dir, built, step + 1, state.history)


def _train_step(built: BuiltRun, state: _LoopState, step: int) -> dict[str, Any]:
    """One optimizer step (gradient accumulation included); the first `measure_steps` run under the meter."""
    ctx, cfg = built.ctx, built.recipe.train
    ctx.step = step
    lr = set_lr(ctx.optimizer, state.multiplier(step))
    batches = [state.train_stream.shuffled(step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
    batches = [_to(built.par.rows(b) if built.par is not None else b, built.device) for b in batches]
    for t in built.techniques:
        t.on_step_start(ctx)
    t0 = time.perf_counter()
    if state.meter is not None and state.measured_left > 0:
        # the tracker is a TorchDispatchMode: a compiled block first called under it is skipped by dynamo for
        # good, so measured steps run eager (they measure what the estimate models; memfit/train/compile.py)
        with state.meter.region(), (torch.compiler.set_stance("force_eager") if cfg.compile
                                    else contextlib.nullcontext()):
            loss = built.train_step(batches)
        state.measured_left -= 1
    else:
        loss = built.train_step(batches)
        if cfg.compile and state.compile_s is None:  # the first compiled step compiles: not a step time
            state.compile_s = time.perf_counter() - t0
        else:
            state.train_time += time.perf_counter() - t0
            state.train_tokens += sum(_count_tokens(b) for b in batches)
    if built.par is not None:
        loss = built.par.mean(loss)  # every rank's mean over its rows: the global batch's mean
    record: dict[str, Any] = {"step": step + 1, "loss": loss, "lr": lr}
    for t in built.techniques:
        t.on_step_end(ctx, record)
    return record


def _evaluate(built: BuiltRun, state: _LoopState, what: str) -> dict[str, float]:
    if state.eval_stream is None:
        return {}
    cfg = built.recipe.train
    return evaluate(built.ctx.model, state.eval_stream, built.recipe.task, built.device, built.data.label_names,
                    cfg.eval_batches, lambda: autocast_for(built.device, cfg.precision), progress=what)


def _result(built: BuiltRun, state: _LoopState, final: dict[str, float], estimate: MemoryBreakdown,
            estimate_peak: int, run_dir: Path | None) -> RunResult:
    cfg, model = built.recipe.train, built.ctx.model
    if state.history:
        state.history[-1].update(final)
    measured = state.meter is not None and state.measured_left < cfg.measure_steps
    spec = f"batch={built.spec.batch} seq={built.spec.seq}"
    tokens, seconds = state.train_tokens, state.train_time
    if built.par is not None:
        report = parallel.memory_report(state.meter, built.par, spec) if measured else None
        tokens = built.par.total(tokens)  # every rank's rows; ranks run in parallel, so the time is one rank's
    else:
        report = state.meter.report(spec=spec) if measured else None
    if cfg.compile and report is not None:
        from memfit.train.compile import COMPILE_NOTE

        report.notes["compile"] = COMPILE_NOTE
    return RunResult(metrics=final, history=state.history, memory=report, estimate=estimate,
                     tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
                     run_dir=run_dir, trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                     total_params=sum(p.numel() for p in model.parameters()),
                     optimizer_state_bytes=state_bytes(built.ctx.optimizer), estimate_peak=estimate_peak,
                     extras=({} if built.par is None else {"rank": built.par.ctx.rank, "world_size": built.par.world})
                     | ({"compile_s": state.compile_s} if cfg.compile else {}))


def _finish_run_dir(run_dir: Path, built: BuiltRun, result: RunResult) -> None:
    steps = built.recipe.train.steps
    if result.metrics and _main(built):
        rundir.append_line(run_dir / rundir.METRICS, json.dumps({"step": steps, "final": True, **result.metrics}))
    _save(run_dir, built, steps, result.history)
    if built.par is not None:
        parallel.export(run_dir, built, built.par)
    else:
        _export(run_dir, built)
    if _main(built):
        write_summary(run_dir, result)


def _main(built: BuiltRun) -> bool:
    """True on the one process that writes the run directory (rank 0 of a distributed run)."""
    return built.par is None or built.par.is_main


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _save(run_dir: Path, built: BuiltRun, step: int, history: list) -> None:
    if built.par is not None:
        parallel.save(run_dir, built, step, len(history), built.par)
        return
    state = {t.name: t.state_dict() for t in built.techniques}
    if built.ctx.grad_scaler is not None:  # 16-mixed: the loss scale and its growth tracker resume exactly
        state[GRAD_SCALER_KEY] = built.ctx.grad_scaler.state_dict()
    ckpt.save_checkpoint(run_dir, step, built.model, built.ctx.optimizer, state,
                         {"recipe": built.recipe.name, "history_len": len(history)},
                         keep=built.recipe.train.keep_checkpoints)


def _resume(run_dir: Path, built: BuiltRun) -> tuple[int, list]:
    """Load the newest intact checkpoint (newer corrupt ones are set aside and named) and the metrics up to it."""
    if built.par is not None:
        step = parallel.resume(run_dir, built, built.par)
        name = f"step-{step:07d}"
    else:
        path, corrupt = ckpt.resumable_checkpoint(run_dir)
        for bad, reason in corrupt:
            aside = ckpt.set_aside(bad)
            note(f"checkpoint {bad.name} is corrupt ({reason}); moved it to {aside} and resuming from {path.name}")
        loaded = ckpt.load_checkpoint(path, built.model, built.ctx.optimizer)
        for t in built.techniques:
            t.load_state_dict(loaded["techniques"].get(t.name, {}))
        if built.ctx.grad_scaler is not None and GRAD_SCALER_KEY in loaded["techniques"]:
            built.ctx.grad_scaler.load_state_dict(loaded["techniques"][GRAD_SCALER_KEY])
        step, name = loaded["meta"]["step"], path.name
    metrics = run_dir / rundir.METRICS
    records, torn = rundir.read_log(metrics)
    if torn:
        note(f"{metrics} ended in a line cut short (the run stopped while writing it); dropped that line")
    # keep what was logged up to the checkpoint, drop what came after
    history = [r for r in records if r.get("step", 0) <= step and not r.get("final")]
    if _main(built):
        rundir.write_text_atomic(metrics, "".join(json.dumps(r) + "\n" for r in history))
        note(f"resuming {built.recipe.name} from {name} (step {step} of {built.recipe.train.steps})")
    return step, history


def _export(run_dir: Path, built: BuiltRun) -> None:
    """Save a loadable HF model folder (model + tokenizer) when the model is a plain transformers model.

    Written under a temporary name and renamed, so `model/` is complete or absent."""
    model = built.model
    if not (hasattr(model, "save_pretrained") and type(model).__module__.startswith("transformers")):
        return
    rundir.write_model_folder(run_dir, model, built.data.tokenizer)


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
    rundir.write_text_atomic(run_dir / "memory.json", json.dumps(summary, indent=2))
    write_report(run_dir)


class _StepProgress:
    """A live bar on a terminal; plain lines at each logged step when piped or in CI (a bar shows nothing there
    until the end); nothing when quiet."""

    def __init__(self, name: str, total: int, done: int, console: Console, quiet: bool):
        self.plain = not quiet and not console.is_terminal
        self.ticker = Ticker(f"{name}: step", total, every_s=0.0, done=done)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=console,
                            disable=quiet or self.plain, transient=False)
        self.task = self.bar.add_task(name, total=total, completed=done, loss=float("nan"))

    def __enter__(self) -> _StepProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, loss: float) -> None:
        self.bar.update(self.task, advance=1, loss=loss)

    def log(self, record: dict[str, Any]) -> None:
        if not self.plain:
            return
        extra = "".join(f" {k} {v:.4g}" for k, v in record.items() if k not in ("step", "loss", "lr")
                        and isinstance(v, (int, float)))
        self.ticker.update(record["step"], f"loss {record['loss']:.4f} lr {record['lr']:.3g}{extra}")
