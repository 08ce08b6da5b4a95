"""Shared file helpers for `memfit.data`: path checks, text reading, content hashes, the on-disk cache."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from memfit.errors import DataError, MemfitError
from memfit.progress import note

CACHE_ENV = "MEMFIT_CACHE"


def existing_file(path: str | Path, what: str = "data file", given_in: str = "the recipe's data section") -> Path:
    """Return `path` as a Path, or raise DataError naming it (and where it was given) if it is not a file."""
    p = Path(path).expanduser()
    if not p.is_file():
        where = p.resolve() if not p.is_absolute() else p
        hint = "it is a directory; name a file inside it" if p.is_dir() else f"check the path in {given_in}"
        raise DataError(f"{what} not found: {p} (resolved to {where}); {hint}")
    return p


def not_text(path: Path, what: str, error: type[MemfitError] = DataError) -> MemfitError | None:
    """The error to raise when `path` is not UTF-8 text (naming the first bad line), or None when it is."""
    data = path.read_bytes()
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        return error(f"{what} {path} is a binary file, not text (a NUL byte on line {line}); point at the "
                     f"{what} itself")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        return error(f"{what} {path} is not UTF-8 text: line {line}, column {column} has byte "
                     f"0x{data[exc.start]:02x}; save the file as UTF-8")
    return None


def read_utf8(path: Path, what: str, error: type[MemfitError] = DataError) -> str:
    """The text of `path`; a binary or non-UTF-8 file is one `error` naming the file and the first bad line."""
    problem = not_text(path, what, error)
    if problem is not None:
        raise problem
    return path.read_text(encoding="utf-8")


@contextmanager
def reading_text(path: Path, what: str = "data file") -> Iterator[None]:
    """Around code that reads `path` as UTF-8 text line by line: a decoding error, or a NUL byte the csv module
    trips over, becomes one `DataError` naming the file and the line."""
    import csv

    try:
        yield
    except (UnicodeDecodeError, csv.Error) as exc:
        problem = not_text(path, what)
        if problem is None:  # a csv problem in valid text (e.g. a field over the size limit)
            raise DataError(f"{what} {path} cannot be parsed: {exc}; fix the file") from None
        raise problem from None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where data caches live: `cache_dir`, else `$MEMFIT_CACHE/tokenizers`, else `~/.cache/memfit/tokenizers`.

    It holds trained tokenizers (`bpe-<key>/`) and token ids of corpus files (`ids-<key>.npy`).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "memfit"
    return root / "tokenizers"


def fingerprint(*parts: object, files: Iterable[Path] = ()) -> str:
    """A short sha256 over the given JSON-able parts and the full contents of `files`."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for f in files:
        h.update(b"\0file\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


def read_documents(path: Path, text_field: str = "text", max_chars: int | None = None) -> list[str]:
    """Documents of a corpus file: a plain-text file is one document, a .jsonl file one per record.

    `max_chars` caps the characters read from the file (documents are cut at the cap).
    """
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read(max_chars) if max_chars else fh.read()
        return [text] if text else []
    docs: list[str] = []
    left = max_chars if max_chars else None
    for lineno, record in iter_jsonl(path):
        if text_field not in record:
            raise DataError(
                f"{path} line {lineno} has no field '{text_field}' (found: {sorted(record)}); "
                f"set data.text_field to the field that holds the text"
            )
        text = str(record[text_field])
        if left is not None:
            text = text[:left]
            left -= len(text)
        if text:
            docs.append(text)
        if left is not None and left <= 0:
            break
    return docs


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a bad line is a `DataError` naming it."""
    with reading_text(path, "JSONL file"), open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {lineno} is not a JSON object; write one object per line")
            yield lineno, record


def text_chunks(text: str, size: int = 1 << 14) -> Iterator[str]:
    """Cut `text` into pieces of about `size` characters, ending at a newline (else before a space) when one is near.

    Pieces are encoded in parallel; concatenating them gives back `text` exactly.
    """
    i, n = 0, len(text)
    while i < n:
        j = text.find("\n", i + size, i + 4 * size)
        if j >= 0:
            j += 1
        else:
            j = text.find(" ", i + size, i + 4 * size)  # a space starts the next pre-token anyway
            if j < 0:
                j = min(n, i + 4 * size)
        yield text[i:j]
        i = j


@contextmanager
def caching(what: str, folder: Path) -> Iterator[None]:
    """Around a write to the cache: a failure (disk full, read-only) is a progress line, not an error — the run
    has what it needs; only the next one recomputes it."""
    try:
        yield
    except OSError as exc:
        note(f"could not cache {what} in {folder} ({exc.strerror or exc}); it is recomputed next time "
             f"(free space there or set {CACHE_ENV} to another folder)")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` via a temporary file and a rename (safe against concurrent writers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
