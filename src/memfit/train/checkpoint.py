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
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from memfit.errors import CheckpointError

LATEST = "latest"
KEEP = 2
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
                    meta: dict) -> Path:
    """Write `step-N/` atomically, point `latest` at it, keep the last `KEEP` checkpoints."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    if optimizer is not None:
        save_state(optimizer.state_dict(), tmp, "optimizer")
    save_state({"rng": rng_state(), "techniques": techniques_state}, tmp, "loop")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(ckpt_root / LATEST, final.name)
    for old in sorted(p for p in ckpt_root.glob("step-*") if p != final)[:-(KEEP - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise CheckpointError(f"checkpoint {path} is incomplete; delete {pointer} to start over")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Restore model and optimizer in place; return meta (with `step`) and the loop state."""
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as exc:  # safetensors raises several types on shape/name mismatch
        raise CheckpointError(f"checkpoint {path} does not match this model: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match this model (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]}); was the recipe changed?")
    if optimizer is not None and (path / "optimizer.json").exists():
        optimizer.load_state_dict(load_state(path, "optimizer"))
    loop = load_state(path, "loop")
    set_rng_state(loop["rng"])
    meta = json.loads((path / "meta.json").read_text())
    return {"meta": meta, "techniques": loop["techniques"]}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
