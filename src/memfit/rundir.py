"""Run directories: what memfit writes into them, how (temporary name, then rename), and when it refuses to.

memfit never deletes or overwrites a file it did not write. A directory memfit created carries a marker
(`.memfit-run`, JSON with the run's name); only such a directory — or one written by an older memfit, recognised by
its `recipe.yaml` next to `metrics.jsonl` or `checkpoints/` — is reused, and only the files listed in `RUN_FILES`
are ever removed from it. Every write error (disk full, read-only file system) becomes one `RunDirError` naming
the file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memfit.errors import CheckpointError, RunDirError

MARKER = ".memfit-run"
METRICS = "metrics.jsonl"
# Everything `memfit train` writes into a run directory; `--overwrite` removes these and nothing else.
RUN_FILES = (MARKER, "recipe.yaml", METRICS, "memory.json", "report.html", "loss.png", "memory.png", "checkpoints",
             "model", "optimizer-state")


def is_run(path: Path) -> bool:
    """Whether `path` is a directory memfit wrote a run into."""
    if (path / MARKER).is_file():
        return True
    return (path / "recipe.yaml").is_file() and ((path / METRICS).is_file() or (path / "checkpoints").is_dir())


def run_name(path: Path) -> str | None:
    """The recipe name of the run in `path` (None when it is not a run or the name cannot be read)."""
    try:
        return json.loads((path / MARKER).read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        import yaml

        return (yaml.safe_load((path / "recipe.yaml").read_text()) or {}).get("name")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def _listing(path: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _has_results(path: Path) -> bool:
    """Whether a run directory holds anything a rerun could lose (metrics, checkpoints, model, report)."""
    metrics = path / METRICS
    return (metrics.is_file() and metrics.stat().st_size > 0) or any(
        (path / name).exists() for name in ("checkpoints", "model", "memory.json"))


def check(run_dir: Path, *, resume: bool = False, overwrite: bool = False, has_checkpoint: bool = False) -> None:
    """Refuse, before anything is built or written, a run that would write where it must not.

    A missing or empty directory (or a run that never got to log anything) takes a new run. A memfit run is
    continued with `resume` and replaced with `overwrite`; without either it is refused. A non-empty directory
    memfit did not write is always refused.
    """
    if resume and overwrite:
        raise RunDirError("--resume continues a run and --overwrite replaces it; pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output {run_dir} is a file, not a directory; choose another --output")
    ancestor = next(p for p in (run_dir.absolute(), *run_dir.absolute().parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        what = "is a file" if not ancestor.is_dir() else "is not writable"
        raise RunDirError(f"cannot create run directory {run_dir}: {ancestor} {what}; choose another --output")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not is_run(run_dir):
        raise RunDirError(f"output {run_dir} is not empty and is not a memfit run (it holds {_listing(run_dir)}); "
                          f"memfit writes only into new or empty folders: choose another --output")
    if resume and not has_checkpoint:
        what = "holds a run but no checkpoint to resume from; start it over with --overwrite" if occupied \
            else "holds no run yet; run without --resume"
        raise CheckpointError(f"--resume: {run_dir} has no checkpoint: it {what}")
    if occupied and not resume and not overwrite and _has_results(run_dir):
        state = "checkpoints" if has_checkpoint else "no checkpoint (it stopped before its first save)"
        hint = "pass --resume to continue it, " if has_checkpoint else ""
        raise RunDirError(f"{run_dir} already holds a run with {state}; {hint}pass --overwrite to replace it, "
                          f"or choose another --output")


def create(run_dir: Path, name: str, *, fresh: bool) -> None:
    """Create the run directory (removing memfit's files of an earlier run when `fresh`) and mark it."""
    if fresh and run_dir.is_dir():
        remove_run_files(run_dir)
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / MARKER).is_file():
        from memfit import __version__

        write_text_atomic(run_dir / MARKER, json.dumps({"name": name, "memfit": __version__}) + "\n")


def remove_run_files(run_dir: Path) -> None:
    """Delete what `memfit train` wrote into `run_dir`; any other file stays."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write under `path` (disk full, read-only, not a directory) into one `RunDirError`."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = exc.filename or path
        raise RunDirError(f"cannot write {where}: {reason}; {_hint(exc.errno)}") from None
    except SafetensorError as exc:  # safetensors writes from Rust and reports the OS error in its message
        if "I/O error" not in str(exc):
            raise
        raise RunDirError(f"cannot write {path}: {str(exc).rsplit(': ', 1)[-1]}; {_hint(None)}") from None


def _hint(errno_: int | None) -> str:
    if errno_ in (errno.ENOTDIR, errno.EEXIST):
        return "a file stands where a folder is needed: choose another --output"
    if errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose an --output you may write to"
    return "free disk space or choose another --output"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name next to `path`, then rename it over `path` (readers never see half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def append_line(path: Path, line: str) -> None:
    """Append one line to a log such as `metrics.jsonl` and flush it (a crash loses at most that line)."""
    with writing(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def read_log(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(records, whether a torn last line was dropped) of a JSON-lines log such as `metrics.jsonl`.

    A crash while a line was being written leaves that last line cut short: it is dropped (the record it held
    was never complete). A damaged line before the last is a `RunDirError` naming it.
    """
    if not path.exists():
        return [], False
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise RunDirError(f"{path} is damaged (not UTF-8 text: {exc.reason}); delete it or restore it") from None
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if lineno == len(lines):
                return records, True
            raise RunDirError(f"{path} line {lineno} is damaged (not a JSON object); fix or delete that line") \
                from None
        records.append(record)
    return records, False


def write_model_folder(run_dir: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """Save a loadable HF folder `run_dir/model` (model + tokenizer; `state_dict`: the weights to write, e.g. gathered
    from shards), under a temporary name and renamed, so `model/` is complete or absent. A model transformers cannot
    serialise (a technique's modules) is noted, not fatal: the checkpoints hold the weights."""
    from memfit.progress import note

    target, tmp = run_dir / "model", run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(target):
            model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    except RunDirError:
        raise
    except Exception as exc:  # techniques may leave modules transformers cannot serialise; checkpoints still exist
        note(f"no model/ folder exported ({type(exc).__name__}: {exc}); the weights are in checkpoints/")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
