"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its own shards in parallel,
and a checkpoint loads on any number of ranks (N -> M), because every tensor is saved in a layout that does not
depend on the world size (model parameters as DTensors; optimizer state in the canonical form of
`ShardedOptimizer.state_dict`).

A checkpoint folder holds DCP's files (tensors only) and `memfit.json` (everything else: hyper-parameters, integer
and float optimizer state such as step counters and projector seeds, state shapes and dtypes, the caller's
`extra`). It is written under a temporary name and renamed once every rank has finished, so a crash never leaves a
half-written checkpoint under the final name. Loading never unpickles a DCP "bytes" item (there are none); DCP's own
`.metadata` file is a pickle, so load only checkpoints you (memfit) wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from memfit.distributed.optim import ShardedOptimizer
from memfit.errors import CheckpointError

FORMAT = "memfit-dcp-1"
META = "memfit.json"


def _sharded(optimizer) -> ShardedOptimizer:
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer
    if isinstance(inner, ShardedOptimizer):  # memfit.optim.layerwise.LayerwiseOptimizer around it
        return inner
    raise CheckpointError(f"{type(optimizer).__name__} is not a ShardedOptimizer (nor layer-wise around one)")


def _split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Optimizer state dict -> (DCP tensors keyed `optim/<fqn>/<key>`, JSON-able state, dtypes)."""
    tensors, values, dtypes = {}, {}, {}
    for fqn, entries in state["state"].items():
        values[fqn], dtypes[fqn] = {}, {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{fqn}/{key}"] = value
                dtypes[fqn][key] = str(value.dtype).removeprefix("torch.")
            else:
                values[fqn][key] = value
    return tensors, values, dtypes


def _merged(obj: dict[str, Any]) -> dict[str, Any]:
    """Union over ranks of each rank's {fqn: {...}} (owners hold some entries alone; shared ones agree)."""
    gathered: list[dict[str, Any]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, obj)
    merged: dict[str, Any] = {}
    for part in gathered:
        for section, entries in part.items():
            for fqn, value in entries.items():
                merged.setdefault(section, {}).setdefault(fqn, value)
    return merged


def save(path: str | Path, model: nn.Module, optimizer=None, extra: dict[str, Any] | None = None) -> Path:
    """Write model (+ optimizer) to `path` from every rank (collective); returns the final path."""
    path = Path(path)
    if path.exists() and not (path / META).exists():
        raise CheckpointError(f"{path} exists and is not a memfit distributed checkpoint; choose another path")
    name = [f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"]
    dist.broadcast_object_list(name, src=0)
    tmp = path.parent / name[0]
    state = {f"model/{k}": v for k, v in get_model_state_dict(model).items()}
    meta: dict[str, Any] = {"format": FORMAT, "world_size": dist.get_world_size(), "extra": extra or {}}
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        tensors, values, dtypes = _split(opt_state)
        state.update(tensors)
        merged = _merged({"values": values, "shapes": opt_state["shapes"], "dtypes": dtypes})
        meta["optimizer"] = {**merged, "param_groups": opt_state["param_groups"],
                             "extra": {k: v for k, v in opt_state.items()
                                       if k not in ("state", "shapes", "param_groups")}}
    dcp.save(state, checkpoint_id=str(tmp))
    if dist.get_rank() == 0:
        (tmp / META).write_text(json.dumps(meta, indent=1))
    dist.barrier()
    if dist.get_rank() == 0:
        _replace(tmp, path)
    dist.barrier()
    return path


def _replace(tmp: Path, path: Path) -> None:
    old = None
    if path.exists():  # a memfit checkpoint (checked in `save`): move aside, swap in, then drop it
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a complete memfit distributed checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load(path: str | Path, model: nn.Module, optimizer=None) -> dict[str, Any]:
    """Restore model (+ optimizer) in place on any number of ranks (collective); returns the saved `extra`."""
    meta = read_meta(path)
    model_state = get_model_state_dict(model)
    state: dict[str, Any] = {f"model/{k}": v for k, v in model_state.items()}
    templates: dict[str, dict[str, torch.Tensor]] = {}
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{path} holds no optimizer state")
        saved = meta["optimizer"]
        templates = _sharded(optimizer).state_templates(saved["shapes"], saved["dtypes"])
        state.update({f"optim/{fqn}/{key}": t for fqn, entries in templates.items() for key, t in entries.items()})
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises several types when keys or shapes differ
        raise CheckpointError(f"checkpoint {path} does not match this model/optimizer: {exc}") from None
    set_model_state_dict(model, {k.removeprefix("model/"): v for k, v in state.items() if k.startswith("model/")})
    if optimizer is not None:
        saved = meta["optimizer"]
        opt_state = {fqn: {**saved["values"].get(fqn, {}), **{k: state[f"optim/{fqn}/{k}"] for k in entries}}
                     for fqn, entries in templates.items()}
        optimizer.load_state_dict({"state": opt_state, "shapes": saved["shapes"],
                                   "param_groups": saved["param_groups"], **saved["extra"]})
    return meta["extra"]
