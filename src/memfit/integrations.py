"""memfit inside other people's training loops.

`MemoryCallback` is a transformers `TrainerCallback` (HF Trainer, TRL's trainers): it measures the first
`measure_steps` optimizer steps by category with `memfit.memory.measure.MemoryMeter` and puts each category's
maximum next to memfit's prediction (a `memfit.plan(...)` result, or an estimate of the model with AdamW at the
Trainer's batch size and the sequence length you give):

    from memfit.integrations import MemoryCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[MemoryCallback(seq=512)])
    trainer.train()                      # logs the table once the measured steps are done; also callback.rows
"""

from __future__ import annotations

import contextlib
from typing import Any

from transformers import TrainerCallback

from memfit.memory.breakdown import TENSOR_CATEGORIES, MemoryBreakdown, format_bytes
from memfit.progress import note


class MemoryCallback(TrainerCallback):
    """Measure memory by category during the first `measure_steps` steps and compare with the prediction."""

    def __init__(self, plan=None, seq: int | None = None, measure_steps: int = 1) -> None:
        if plan is None and seq is None:
            raise ValueError("MemoryCallback needs the sequence length (seq=...) or a memfit.plan(...) result")
        self.plan, self.seq, self.measure_steps = plan, seq, measure_steps
        self.report = None  # memfit MemoryReport of the measured steps
        self.predicted: MemoryBreakdown | None = None
        self.predicted_peak: int | None = None
        self.rows: list[dict[str, Any]] = []
        self._meter = None
        self._stack: contextlib.ExitStack | None = None
        self._measured = 0

    # --- the Trainer's events ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from memfit.memory.measure import MemoryMeter

        self._meter = MemoryMeter(model, optimizer)
        self._predict(args, model)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._meter is not None and self._measured < self.measure_steps and self._stack is None:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(self._meter.region())

    def on_step_end(self, args, state, control, **kwargs):
        if self._stack is None:
            return
        self._stack.close()
        self._stack = None
        self._measured += 1
        if self._measured == self.measure_steps:
            self.report = self._meter.report()
            self._meter = None
            self.rows = self._rows()
            note(self.text())

    # --- what it reports -----------------------------------------------------------------------------------
    def _predict(self, args, model) -> None:
        if self.plan is not None:
            row = self.plan.chosen
            self.predicted, self.predicted_peak = row.breakdown, row.peak
            return
        from memfit.memory.estimate import estimate_step
        from memfit.memory.runtime import with_runtime
        from memfit.memory.spec import RunSpec
        from memfit.techniques.registry import build_technique

        device = next(model.parameters()).device
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        spec = RunSpec.from_model(model, batch=args.per_device_train_batch_size, seq=self.seq, task="causal_lm",
                                  compute_dtype="bf16" if args.bf16 else "fp32", attn_impl=attn,
                                  grad_accum=args.gradient_accumulation_steps, extra={"device": device.type})
        techniques = [build_technique("optimizer", "adamw")]
        breakdown, peak = estimate_step(spec, techniques)
        self.predicted, _ = with_runtime(breakdown, peak, spec, techniques)
        self.predicted_peak = peak

    def _rows(self) -> list[dict[str, Any]]:
        measured = self.report.category_peaks
        rows = [{"category": c, "measured": getattr(measured, c), "predicted": getattr(self.predicted, c)}
                for c in TENSOR_CATEGORIES if getattr(measured, c) or getattr(self.predicted, c)]
        rows.append({"category": "tensor peak", "measured": self.report.tensor_peak, "predicted": self.predicted_peak})
        if self.report.process_peak is not None and self.predicted.runtime:
            rows.append({"category": "process peak", "measured": self.report.process_peak,
                         "predicted": self.predicted_peak + self.predicted.runtime})
        return rows

    def text(self) -> str:
        lines = [f"memfit memory over the first {self.measure_steps} step(s): category  measured  predicted  ratio"]
        for r in self.rows:
            ratio = f"{r['measured'] / r['predicted']:.2f}" if r["predicted"] else "-"
            lines.append(f"  {r['category']:<13} {format_bytes(r['measured']):>11} {format_bytes(r['predicted']):>11}"
                         f"  {ratio}")
        return "\n".join(lines)
