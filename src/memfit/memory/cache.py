"""A small on-disk memo for pure results that are slow to compute only because of what they import.

The planner reads the model's facts off a meta model (transformers' modeling code: seconds to import) and sizes
adapters by wrapping a skeleton with peft (the same): both are pure functions of data, so `memo` stores their
result in `$MEMFIT_CACHE/<kind>/`, keyed by the inputs' repr, the versions of the libraries involved and the source
of memfit's code that computes them — a changed input, library or memfit file computes afresh. What is read back
is exactly what the same code wrote.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_PACKAGE = Path(__file__).resolve().parents[1]  # src/memfit


def cache_dir() -> Path:
    return Path(os.environ.get("MEMFIT_CACHE", Path.home() / ".cache" / "memfit"))


@functools.cache
def _fingerprint(sources: tuple[str, ...], libraries: tuple[str, ...]) -> bytes:
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    for lib in libraries:
        try:
            digest.update(f"{lib} {version(lib)}\n".encode())
        except PackageNotFoundError:
            digest.update(f"{lib} none\n".encode())
    for name in sources:
        target = _PACKAGE / name
        for file in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            digest.update(file.read_bytes())
    return digest.digest()


def memo(kind: str, key: Any, compute: Callable[[], T], sources: Sequence[str] = (),
         libraries: Sequence[str] = ("torch", "transformers")) -> T:
    """`compute()`, or what it returned before for the same `key` (its repr), library versions and `sources`
    (paths under the memfit package whose code decides the result)."""
    digest = hashlib.sha256(_fingerprint(tuple(sources), tuple(libraries)) + repr(key).encode()).hexdigest()[:32]
    path = cache_dir() / kind / f"{digest}.pickle"
    try:
        return pickle.loads(path.read_bytes())
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - a truncated or stale file: compute afresh and overwrite it
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(value))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache: computed again next time
    return value
