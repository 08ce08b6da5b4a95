"""Byte-level BPE tokenizer trained on the corpus (for models trained from scratch), cached on disk.

Built with the `tokenizers` library (GPT-2 style byte-level pre-tokenization, so every string round-trips)
and wrapped as a `transformers.PreTrainedTokenizerFast` so models, `generate` and `save_pretrained` just work.
The cache key covers the corpus file contents, `vocab_size`, `max_chars` and `text_field`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from memfit.data.io import cache_root, caching, existing_file, fingerprint, read_documents, text_chunks
from memfit.errors import DataError
from memfit.progress import duration, note

EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<|startoftext|>"
SPECIAL_TOKENS = (EOS, PAD, BOS)
_FORMAT = 2  # bump when the training recipe below changes, so old caches are not reused


def tokenizer_key(paths: Sequence[Path], vocab_size: int, max_chars: int | None, text_field: str = "text") -> str:
    """Cache key of the tokenizer trained on `paths` with these settings."""
    return fingerprint("bpe", _FORMAT, vocab_size, max_chars, text_field, files=paths)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE `tokenizers.Tokenizer` on `texts` (specials get ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def wrap(tok):
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer with eos/pad/bos set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS, clean_up_tokenization_spaces=False
    )


def corpus_tokenizer(
    paths: Sequence[str | Path],
    vocab_size: int = 8192,
    *,
    max_chars: int | None = None,
    text_field: str = "text",
    cache_dir: str | Path | None = None,
):
    """The BPE tokenizer for these corpus files: loaded from the cache, or trained and cached.

    The cache is the folder `bpe-<key>/` in `cache_dir` (default `$MEMFIT_CACHE/tokenizers` or
    `~/.cache/memfit/tokenizers`); it is a `save_pretrained` folder, loadable with `AutoTokenizer`.
    """
    from transformers import PreTrainedTokenizerFast

    files = [existing_file(p, "corpus file") for p in paths]
    key = tokenizer_key(files, vocab_size, max_chars, text_field)
    target = cache_root(cache_dir) / f"bpe-{key}"
    if (target / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(target))

    def texts():
        for f in files:
            for doc in read_documents(f, text_field, max_chars):
                yield from text_chunks(doc)

    if not any(True for _ in texts()):
        raise DataError(f"no text to train a tokenizer on in {', '.join(map(str, files))}; the files are empty")
    size = sum(f.stat().st_size for f in files)
    note(f"training a BPE tokenizer (vocab {vocab_size:,}) on {', '.join(f.name for f in files)} "
         f"({size / 2**20:.1f} MiB); done once, then cached in {target.parent}")
    start = time.perf_counter()
    tokenizer = wrap(train_bpe(texts(), vocab_size))
    note(f"tokenizer trained in {duration(time.perf_counter() - start)}")
    with caching("the tokenizer", target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".bpe-{key}."))
        try:
            tokenizer.save_pretrained(str(tmp))
            tmp.chmod(0o755)
            try:
                tmp.rename(target)  # atomic; loses the race harmlessly if another process cached it first
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
