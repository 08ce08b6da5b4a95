"""Token classification from CoNLL files, with word tags aligned to sub-word tokens.

Format: one `TOKEN ... TAG ...` line per word (whitespace-separated columns; the tag column is configurable),
a blank line between sentences, `-DOCSTART-` lines skipped. The label list is the sorted set of tags in the
train file; the eval file reuses it. The first sub-token of each word carries the word's tag; the other
sub-tokens and the special tokens get -100 (ignored by the loss and by entity-F1 evaluation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memfit.data.classification import EncodedDataset, subsample
from memfit.data.collate import IGNORE_INDEX
from memfit.data.io import existing_file, reading_text
from memfit.errors import DataError


def read_conll(path: str | Path, tag_column: int = 1) -> tuple[list[list[str]], list[list[str]], list[int]]:
    """(sentences as word lists, tag lists, first line number of each sentence)."""
    p = existing_file(path, "CoNLL file")
    sents: list[list[str]] = []
    tags: list[list[str]] = []
    starts: list[int] = []
    words: list[str] = []
    wtags: list[str] = []
    start = 0
    with reading_text(p, "CoNLL file"), open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if words:
                    sents.append(words)
                    tags.append(wtags)
                    starts.append(start)
                words, wtags = [], []
                continue
            if len(cols) <= tag_column:
                raise DataError(
                    f"{p} line {lineno} has {len(cols)} column(s) but data.tag_column is {tag_column} "
                    f"(0-based); set data.tag_column to the column that holds the tag"
                )
            if not words:
                start = lineno
            words.append(cols[0])
            wtags.append(cols[tag_column])
    if words:
        sents.append(words)
        tags.append(wtags)
        starts.append(start)
    if not sents:
        raise DataError(f"{p} has no sentences (empty file); point data.train/eval at a CoNLL file with data")
    return sents, tags, starts


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Per-token labels: the word's label on its first sub-token, -100 on later sub-tokens and specials."""
    out: list[int] = []
    prev = None
    for w in word_ids:
        out.append(IGNORE_INDEX if w is None or w == prev else word_labels[w])
        prev = w
    return out


def encode_conll(sents: list[list[str]], tag_ids: list[list[int]], tokenizer: Any, max_length: int) -> EncodedDataset:
    """Tokenize pre-split sentences (truncating to `max_length`) and align the labels."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "token classification needs a fast (Rust) tokenizer for word alignment; use a model with tokenizer.json"
        )
    enc = tokenizer(sents, is_split_into_words=True, truncation=True, max_length=max_length)
    labels = [align_labels(enc.word_ids(i), tag_ids[i]) for i in range(len(sents))]
    fields: dict[str, list[Any]] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        fields["token_type_ids"] = enc["token_type_ids"]
    fields["labels"] = labels
    return EncodedDataset(fields)


def build_conll(cfg, tokenizer: Any, seed: int = 0) -> tuple[EncodedDataset, EncodedDataset | None, list[str]]:
    """(train, eval or None, label names) for a `ConllData` config."""
    sents, tags, _ = read_conll(cfg.train, cfg.tag_column)
    label_names = sorted({t for ts in tags for t in ts})
    index = {t: i for i, t in enumerate(label_names)}
    keep = subsample(len(sents), cfg.max_train_examples, seed)
    train = encode_conll(
        [sents[i] for i in keep], [[index[t] for t in tags[i]] for i in keep], tokenizer, cfg.max_length
    )
    evalset = None
    if cfg.eval:
        sents, tags, starts = read_conll(cfg.eval, cfg.tag_column)
        for ts, start in zip(tags, starts):
            for k, t in enumerate(ts):
                if t not in index:
                    raise DataError(
                        f"{cfg.eval} line {start + k}: tag {t!r} does not occur in the train file {cfg.train} "
                        f"(train tags: {label_names}); use matching files or fix the tag"
                    )
        keep = subsample(len(sents), cfg.max_eval_examples, None)
        evalset = encode_conll(
            [sents[i] for i in keep], [[index[t] for t in tags[i]] for i in keep], tokenizer, cfg.max_length
        )
    return train, evalset, label_names
