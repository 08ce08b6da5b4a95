"""Checkpoints: tensors in safetensors, everything else in JSON, written to a temporary folder and renamed,
so a crash never leaves a half-written checkpoint. Resume is exact: model, optimizer, techniques' loop state,
RNG and data position (the data order is a function of seed and step)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from memfit.errors import CheckpointError
from memfit.rundir import write_text_atomic, writing

LATEST = "latest"  # the newest checkpoint's name, for people and tools; resume trusts the folders themselves
KEEP = 2  # default of the recipe key train.keep_checkpoints
_TENSOR = "__tensor__"


def flatten_state(obj: Any, prefix: str = "", tensors: dict[str, torch.Tensor] | None = None):
    """Split a nested state (dicts / lists / tensors / scalars) into a JSON tree and a flat tensor dict."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}, tensors
    if isinstance(obj, dict):
        items = {}
        for k, v in obj.items():
            items[str(k)] = flatten_state(v, f"{prefix}.{k}" if prefix else str(k), tensors)[0]
        return {"__dict__": items, "__int_keys__": [str(k) for k in obj if isinstance(k, int)]}, tensors
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, f"{prefix}.{i}", tensors)[0] for i, v in enumerate(obj)]
        return {"__list__": items, "__tuple__": isinstance(obj, tuple)}, tensors
    return obj, tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict) and _TENSOR in tree:
        return tensors[tree[_TENSOR]]
    if isinstance(tree, dict) and "__dict__" in tree:
        int_keys = set(tree["__int_keys__"])
        return {(int(k) if k in int_keys else k): unflatten_state(v, tensors) for k, v in tree["__dict__"].items()}
    if isinstance(tree, dict) and "__list__" in tree:
        items = [unflatten_state(v, tensors) for v in tree["__list__"]]
        return tuple(items) if tree["__tuple__"] else items
    return tree


def save_state(state: Any, folder: Path, name: str) -> None:
    tree, tensors = flatten_state(state)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(tree))


def load_state(folder: Path, name: str) -> Any:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return unflatten_state(json.loads((folder / f"{name}.json").read_text()), tensors)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, techniques_state: dict,
                    meta: dict, keep: int = KEEP) -> Path:
    """Write `step-N/` atomically, point `latest` at it, keep the newest `keep` checkpoints.

    `meta.json` is written last and lists every file's size, so a checkpoint cut short later (a full disk, an
    interrupted copy) is recognised as corrupt instead of being loaded."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    try:
        with writing(ckpt_root):
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_model(model, str(tmp / "model.safetensors"))
            if optimizer is not None:
                save_state(optimizer.state_dict(), tmp, "optimizer")
            save_state({"rng": rng_state(), "techniques": techniques_state}, tmp, "loop")
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "files": files}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves no half checkpoint taking space
    write_text_atomic(ckpt_root / LATEST, final.name)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    root = run_dir / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def has_checkpoint(run_dir: Path) -> bool:
    return bool(checkpoints(run_dir))


def problem(path: Path) -> str | None:
    """Why the checkpoint in `path` cannot be loaded (missing or cut-short files), or None when it is intact."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json is missing (the checkpoint was not finished)"
    except (OSError, ValueError) as exc:
        return f"meta.json is unreadable ({exc})"
    sizes = meta.get("files") or {}  # checkpoints of older memfit versions list no sizes
    for name in sorted(set(sizes) | {"model.safetensors", "loop.safetensors", "loop.json"}):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if name in sizes and f.stat().st_size != sizes[name]:
            return f"{name} is {f.stat().st_size:,} bytes, {sizes[name]:,} when written (cut short)"
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(f), "pt"):
                    pass
            except Exception as exc:  # safetensors reports a damaged header with several error types
                return f"{name} is damaged ({exc})"
    return None


def resumable_checkpoint(run_dir: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """(the newest intact checkpoint, the newer ones skipped as corrupt with the reason for each)."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(checkpoints(run_dir)):
        if (path / "memfit.json").exists():  # memfit.distributed.checkpoint.META: not corrupt, another format
            raise CheckpointError(f"{path} was written by a distributed run (memfit train --nproc N); resume it "
                                  "with --nproc (any number of ranks)")
        reason = problem(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    if skipped:
        raise CheckpointError(f"every checkpoint in {run_dir / 'checkpoints'} is corrupt (newest: "
                              f"{skipped[0][0].name}: {skipped[0][1]}); start the run over with --overwrite")
    raise CheckpointError(f"--resume: {run_dir} has no checkpoint; run without --resume")


def set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint to `corrupt-step-N` (kept for inspection, never loaded or pruned)."""
    target = path.with_name(f"corrupt-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    return target


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Restore model and optimizer in place; return meta (with `step`) and the loop state."""
    reason = problem(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: {reason}")
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as exc:  # safetensors raises several types on shape/name mismatch
        raise CheckpointError(f"checkpoint {path} does not match this model: {exc}; was the recipe changed?") \
            from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match this model (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]}); was the recipe changed?")
    if optimizer is not None and (path / "optimizer.json").exists():
        optimizer.load_state_dict(load_state(path, "optimizer"))
    loop = load_state(path, "loop")
    set_rng_state(loop["rng"])
    meta = json.loads((path / "meta.json").read_text())
    return {"meta": meta, "techniques": loop["techniques"]}
