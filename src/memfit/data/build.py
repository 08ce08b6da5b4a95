"""`build_data`: the one entry point the run loop calls to turn a recipe's `data:` section into datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memfit.data.classification import build_classification
from memfit.data.collate import PadCollator
from memfit.data.config import ClassificationData, ConllData, DataBundle, DataConfig, TextData
from memfit.data.ner import build_conll
from memfit.data.text import build_text, describe
from memfit.data.tokenizer import corpus_tokenizer
from memfit.errors import DataError


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else int(pad)


def build_data(
    config: DataConfig, tokenizer: Any = None, *, cache_dir: Path | None = None, seed: int = 0
) -> DataBundle:
    """Datasets, collator and tokenizer for a `data:` config.

    text: with `tokenizer=None` a byte-level BPE tokenizer is trained on the corpus (cached) and returned as
    `bundle.tokenizer`; classification / conll need the pretrained model's tokenizer. `cache_dir` holds the
    trained tokenizers and cached token ids (default `$MEMFIT_CACHE/tokenizers` or `~/.cache/memfit/tokenizers`); `seed` picks the `max_train_examples` subset.
    """
    if isinstance(config, TextData):
        if tokenizer is None:
            tokenizer = corpus_tokenizer(
                config.paths,
                config.vocab_size,
                max_chars=config.max_chars,
                text_field=config.text_field,
                cache_dir=cache_dir,
            )
        train, val = build_text(config, tokenizer, cache_dir)
        return DataBundle(
            train=train,
            eval=val,
            collate=PadCollator(_pad_id(tokenizer)),
            tokenizer=tokenizer,
            stats=describe(train, val),
        )
    if tokenizer is None:
        raise DataError(f"data kind '{config.kind}' needs the pretrained model's tokenizer; pass tokenizer=")
    if isinstance(config, ClassificationData):
        train, evalset, num_labels = build_classification(config, tokenizer, seed)
        names = [str(i) for i in range(num_labels)]
    elif isinstance(config, ConllData):
        train, evalset, names = build_conll(config, tokenizer, seed)
        num_labels = len(names)
    else:
        raise DataError(f"unknown data config {type(config).__name__}; use kind text, classification or conll")
    stats = {"train_examples": len(train), "eval_examples": len(evalset) if evalset is not None else 0}
    return DataBundle(
        train=train,
        eval=evalset,
        collate=PadCollator(_pad_id(tokenizer)),
        tokenizer=tokenizer,
        num_labels=num_labels,
        label_names=names,
        stats=stats,
    )
