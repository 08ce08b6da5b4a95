"""Sequence classification files (TSV / CSV / JSONL by extension) with a named text and integer label column."""

from __future__ import annotations

import csv
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from memfit.data.io import existing_file, iter_jsonl, reading_text
from memfit.errors import DataError


class EncodedDataset(Dataset):
    """Pre-tokenized examples; item i is a dict of LongTensors (1-D per-token fields, 0-D sequence label)."""

    def __init__(self, fields: dict[str, list[Any]]):
        lengths = {len(v) for v in fields.values()}
        assert len(lengths) == 1, "all fields need one value per example"
        self.fields = fields
        self._n = lengths.pop()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v[i], dtype=torch.long) for k, v in self.fields.items()}


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each row of a .tsv/.csv (header line first) or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        yield from iter_jsonl(path)
        return
    if suffix not in (".tsv", ".csv", ".txt"):
        raise DataError(f"cannot tell the format of {path}: use a .tsv, .csv or .jsonl file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with reading_text(path, "classification file"), open(path, encoding="utf-8", newline="") as fh:
        if suffix == ".csv":
            reader = csv.reader(fh)
        else:  # GLUE-style TSV: quotes are literal characters
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {reader.line_num} has {len(row)} fields but the header has {len(header)} "
                    f"({header}); fix that row"
                )
            yield reader.line_num, dict(zip(header, row))


def read_examples(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[int], list[int]]:
    """(texts, labels, line numbers) of a classification file; checks columns and integer labels."""
    p = existing_file(path, "classification file")
    texts: list[str] = []
    labels: list[int] = []
    lines: list[int] = []
    for lineno, record in _rows(p):
        missing = [c for c in (text_column, label_column) if c not in record]
        if missing:
            raise DataError(
                f"{p} has no column {', '.join(repr(c) for c in missing)} (line {lineno}); columns found: "
                f"{sorted(record)}; asked for text_column={text_column!r}, label_column={label_column!r} — "
                f"set data.text_column / data.label_column to the right names"
            )
        raw = record[label_column]
        try:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            label = int(raw) if not isinstance(raw, str) else int(raw.strip())
        except (TypeError, ValueError):
            raise DataError(
                f"{p} line {lineno}: label {raw!r} in column {label_column!r} is not an integer; "
                f"labels must be class indices 0..num_labels-1 (map names to integers first)"
            ) from None
        texts.append(str(record[text_column]))
        labels.append(label)
        lines.append(lineno)
    if not texts:
        raise DataError(f"{p} has no examples (empty file or header only); point data.train/eval at a filled file")
    return texts, labels, lines


def check_labels(path: str | Path, labels: list[int], lines: list[int], num_labels: int) -> None:
    """Raise DataError for the first label outside 0..num_labels-1."""
    for label, lineno in zip(labels, lines):
        if not 0 <= label < num_labels:
            raise DataError(
                f"{path} line {lineno}: label {label} is out of range for num_labels={num_labels} "
                f"(labels must be 0..{num_labels - 1}); fix the label or raise data.num_labels"
            )


def subsample(n: int, k: int | None, seed: int | None) -> list[int]:
    """Indices of the examples to keep: all, the first k (seed None), or k drawn with `seed`, in file order."""
    if k is None or k >= n:
        return list(range(n))
    if seed is None:
        return list(range(k))
    return sorted(random.Random(seed).sample(range(n), k))


def encode(texts: list[str], labels: list[int], tokenizer: Any, max_length: int) -> EncodedDataset:
    """Tokenize (truncating to `max_length`) into an `EncodedDataset` with input_ids, attention_mask, labels."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    fields: dict[str, list[Any]] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        fields["token_type_ids"] = enc["token_type_ids"]
    fields["labels"] = labels
    return EncodedDataset(fields)


def build_classification(cfg, tokenizer: Any, seed: int = 0) -> tuple[EncodedDataset, EncodedDataset | None, int]:
    """(train, eval or None, num_labels) for a `ClassificationData` config."""
    texts, labels, lines = read_examples(cfg.train, cfg.text_column, cfg.label_column)
    num_labels = cfg.num_labels if cfg.num_labels is not None else max(labels) + 1
    if num_labels < 2:
        raise DataError(
            f"{cfg.train}: every label is {labels[0]}, so there is only one class; "
            f"set data.num_labels (>= 2) or use a file with several classes"
        )
    check_labels(cfg.train, labels, lines, num_labels)
    keep = subsample(len(texts), cfg.max_train_examples, seed)
    train = encode([texts[i] for i in keep], [labels[i] for i in keep], tokenizer, cfg.max_length)
    evalset = None
    if cfg.eval:
        texts, labels, lines = read_examples(cfg.eval, cfg.text_column, cfg.label_column)
        check_labels(cfg.eval, labels, lines, num_labels)
        keep = subsample(len(texts), cfg.max_eval_examples, None)
        evalset = encode([texts[i] for i in keep], [labels[i] for i in keep], tokenizer, cfg.max_length)
    return train, evalset, num_labels
