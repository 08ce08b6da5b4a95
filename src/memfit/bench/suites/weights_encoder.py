"""`memfit bench weights`, section `encoder`: SST-2 accuracy and CoNLL-2003 entity F1 of the classification and
NER runs in every weight format, next to fp32 (issue 16 item 9).

The runs are memfit fine-tuning runs (recipes/finetune-cls.yaml, recipes/finetune-ner.yaml) named by
`MEMFIT_CLS_RUN` / `MEMFIT_NER_RUN`; without them the section is skipped (training them takes minutes). Each
format is applied to a fresh load of the run's model by `memfit.predict` (the same code as `memfit predict`); the
texts are the first `n` sentences of SST-2's test.tsv and CoNLL-2003's test.txt (`--quick`: 200 each, else all).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from memfit.bench.harness import BenchOptions

FORMATS: list[tuple[str, str | None, bool]] = [
    ("fp32", None, False), ("int8", "int8", False), ("int8+embed", "int8", True), ("int4-g64", "int4", False),
    ("int4-g64+embed", "int4", True), ("nf4-g64", "nf4", False), ("dfloat11", "dfloat11", False),
]


def _sst2(data: Path, n: int | None) -> tuple[list[str], list[int]]:
    from memfit.data.classification import read_examples

    texts, labels, _ = read_examples(data / "sst2/test.tsv", "sentence", "label")
    return texts[:n], labels[:n]


def _conll(data: Path, n: int | None) -> tuple[list[list[str]], list[list[str]]]:
    from memfit.data.ner import read_conll

    words, tags, _ = read_conll(data / "conll2003/test.txt")
    return words[:n], tags[:n]


def rows(opts: BenchOptions) -> list[dict]:
    from seqeval.metrics import f1_score

    from memfit.predict import apply_format, classify, load_encoder, word_labels
    from memfit.weights import weight_bytes

    data = Path(opts.data_dir)
    n = 200 if opts.quick else None
    runs = {"sst2": os.environ.get("MEMFIT_CLS_RUN"), "conll2003": os.environ.get("MEMFIT_NER_RUN")}
    out: list[dict] = []
    for task, run in runs.items():
        if not run:
            continue
        examples = _sst2(data, n) if task == "sst2" else _conll(data, n)
        for method, fmt, embeddings in FORMATS:
            if not opts.wants(method):
                continue
            model, tokenizer, _ = load_encoder(run)
            apply_format(model, fmt, embeddings)
            t0 = time.perf_counter()
            if task == "sst2":
                ids = model.config.label2id
                pred = [ids[classify(model, tokenizer, t)["label"]] for t in examples[0]]
                score = sum(p == g for p, g in zip(pred, examples[1])) / len(pred)
            else:
                pred_tags = [word_labels(model, tokenizer, w) for w in examples[0]]
                score = f1_score(examples[1], pred_tags)
            seconds = (time.perf_counter() - t0) / len(examples[0])
            out.append({"section": "encoder", "method": method, "task": task, "sentences": len(examples[0]),
                        "metric": "accuracy" if task == "sst2" else "entity F1", "score": score,
                        "weight_mib": weight_bytes(model) / 2**20, "ms_per_sentence": 1e3 * seconds})
    if out:
        for task in runs:
            base = next((r["score"] for r in out if r["task"] == task and r["method"] == "fp32"), None)
            for r in out:
                if r["task"] == task and base:
                    r["score_vs_fp32"] = r["score"] / base
    return out
