"""`memfit bench baseline`: full AdamW on the three standard workloads (pretrain, finetune-cls, finetune-ner).

`--precision P` (repeatable) runs each workload in each train precision, its MFU against the matmul peak of that
precision's compute dtype measured in the same run; `--compile` adds a `train.compile: true` row after each."""

from __future__ import annotations

from memfit.bench.harness import BenchOptions, train_row
from memfit.bench.workloads import workload


def run(opts: BenchOptions) -> list[dict]:
    steps = {"pretrain": 300, "finetune-cls": 300, "finetune-ner": 300}
    if opts.quick:
        steps = {k: 10 for k in steps}
    rows = []
    for name, n in steps.items():
        if not opts.wants(name):
            continue
        for prec in opts.precisions or [None]:
            for compiled in (False, True) if opts.compile else (False,):
                extra = {"eval_batches": 4} if opts.quick else {}
                if prec is not None:
                    extra["precision"] = prec
                recipe = workload(name, opts.data_dir, steps=n, measure_steps=2, eval_every=0, compile=compiled,
                                  **extra)
                rows.append(train_row(recipe, "adamw", opts, workload=name, precision=prec or recipe["train"].get(
                    "precision", "32-true"), compile=compiled))
    return rows
