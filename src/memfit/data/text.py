"""Text corpora → token ids → packed blocks for causal-LM training, with the last fraction of each file held out.

Each file is tokenized in full (documents separated by the eos token), its last `val_fraction` of tokens
goes to validation, and the train / validation streams of all files are concatenated and cut into
non-overlapping blocks of `block_size` tokens (the remainder is dropped). Token ids are cached as .npy next
to the tokenizer cache, so a second run reads them instead of tokenizing again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from memfit.data.config import TextData
from memfit.data.io import (cache_root, caching, existing_file, fingerprint, read_documents, save_npy_atomic,
                            text_chunks)
from memfit.errors import DataError
from memfit.progress import duration, note


class PackedBlocks(Dataset):
    """Fixed-length blocks of token ids; items are `{"input_ids", "labels"}` (labels = input_ids, models shift)."""

    def __init__(self, ids: np.ndarray, block_size: int):
        n = len(ids) // block_size
        self.block_size = block_size
        self.blocks = torch.from_numpy(np.ascontiguousarray(ids[: n * block_size], dtype=np.int64)).view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.blocks[i]
        return {"input_ids": x, "labels": x.clone()}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of the tokenizer's full definition (fast tokenizers only; None means: do not cache ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return fingerprint("tok", backend.to_str(), tokenizer.eos_token_id)


def encode_documents(docs: list[str], tokenizer: Any) -> np.ndarray:
    """Token ids of `docs`, each followed by the eos token (when the tokenizer has one), as int32."""
    eos = tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a private copy without the model's truncation / padding settings
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    parts: list[np.ndarray] = []
    for doc in docs:
        chunks = list(text_chunks(doc))
        if backend is not None:  # parallel Rust batch encode; no special tokens, no length warnings
            encoded = [e.ids for e in backend.encode_batch(chunks, add_special_tokens=False)]
        else:
            encoded = tokenizer(chunks, add_special_tokens=False)["input_ids"]
        parts.extend(np.asarray(e, dtype=np.int32) for e in encoded)
        if eos is not None:
            parts.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def file_token_ids(path: Path, tokenizer: Any, cfg: TextData, cache_dir: str | Path | None = None) -> np.ndarray:
    """All token ids of one corpus file (cached on disk keyed by file contents, tokenizer and settings)."""
    tok_key = tokenizer_fingerprint(tokenizer)
    cached = None
    if tok_key is not None:
        key = fingerprint("ids", 2, tok_key, cfg.max_chars, cfg.text_field, files=[path])
        cached = cache_root(cache_dir) / f"ids-{key}.npy"
        if cached.is_file():
            return np.load(cached)
    start = time.perf_counter()
    ids = encode_documents(read_documents(path, cfg.text_field, cfg.max_chars), tokenizer)
    if time.perf_counter() - start > 2:  # worth a line only when it took a while (cached from now on)
        note(f"tokenized {path.name}: {len(ids):,} tokens in {duration(time.perf_counter() - start)}")
    if cached is not None and len(ids):
        with caching(f"the token ids of {path.name}", cached.parent):
            save_npy_atomic(cached, ids)
    return ids


def split_ids(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): validation is the last `val_fraction` of the tokens."""
    n_val = round(len(ids) * val_fraction)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def build_text(cfg: TextData, tokenizer: Any, cache_dir: str | Path | None = None) -> tuple[PackedBlocks, PackedBlocks]:
    """Train and validation `PackedBlocks` for `cfg` tokenized with `tokenizer`."""
    if not cfg.paths:
        raise DataError("data.paths is empty; list at least one text or .jsonl corpus file")
    files = [existing_file(p, "corpus file") for p in cfg.paths]
    train_parts, val_parts = [], []
    for f in files:
        ids = file_token_ids(f, tokenizer, cfg, cache_dir)
        if len(ids) == 0:
            raise DataError(f"corpus file {f} is empty (no text in it); remove it from data.paths or fill it")
        tr, va = split_ids(ids, cfg.val_fraction)
        train_parts.append(tr)
        val_parts.append(va)
    train_ids, val_ids = np.concatenate(train_parts), np.concatenate(val_parts)
    for name, ids, hint in (
        ("training", train_ids, "use a larger corpus or raise max_chars"),
        ("validation", val_ids, f"raise data.val_fraction (now {cfg.val_fraction})"),
    ):
        if len(ids) < cfg.block_size:
            raise DataError(
                f"block_size {cfg.block_size} is larger than the {name} split ({len(ids)} tokens); "
                f"lower data.block_size or {hint}"
            )
    return PackedBlocks(train_ids, cfg.block_size), PackedBlocks(val_ids, cfg.block_size)


def describe(train: PackedBlocks, val: PackedBlocks) -> dict[str, Any]:
    """Sizes worth logging."""
    return {
        "train_blocks": len(train),
        "eval_blocks": len(val),
        "train_tokens": train.num_tokens,
        "eval_tokens": val.num_tokens,
        "block_size": train.block_size,
    }
