"""`memfit bench baseline`: full AdamW on the three standard workloads (pretrain, finetune-cls, finetune-ner)."""

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
        recipe = workload(name, opts.data_dir, steps=n, measure_steps=2, eval_every=0,
                          **({"eval_batches": 4} if opts.quick else {}))
        rows.append(train_row(recipe, "adamw", opts, workload=name))
    return rows
