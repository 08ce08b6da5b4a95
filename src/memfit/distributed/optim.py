"""Every memfit optimizer on FSDP2-sharded (DTensor) parameters, unchanged: a thin adapter decides, per parameter,
where its update runs.

- **local** — the optimizer's math for this parameter is elementwise or row-wise (AdamW, 8-bit AdamW on blocks that
  never cross a row boundary, Adam-mini's per-row blocks, SCALE's row-normalised embeddings, the AdamW fallback of
  every low-rank method): the optimizer steps a plain tensor aliasing this rank's shard, so its state is sharded
  exactly like the parameter and no communication happens.
- **owner** — the math needs the whole matrix (GaLore/Natural GaLore/FRUGAL projections and SVDs, APOLLO's
  channel/tensor scaling and norm limiter, SCALE's column norms, Adam-mini's per-head and per-tensor blocks, 8-bit
  blocks that would straddle shards): one rank, the least loaded so far, gathers the full parameter and gradient, runs
  the optimizer's own step on them, and scatters the new rows back. That matrix's state lives on its owner only,
  so state is sharded matrix by matrix; a window of N matrices (N owners) is stepped in parallel.

Why gather-to-owner rather than all-gather-on-every-rank or shard-local projection: see the package README.

The inner optimizer is the one the technique built (so hyper-parameters, seeds and names are its own); its groups
are rebuilt over proxies, and this wrapper exposes the original groups (DTensor parameters) to LR schedulers and to
`memfit.optim.layerwise`, copying their hyper-parameters into the inner groups before every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from memfit.distributed.collectives import RowExchange, check_layout
from memfit.distributed.support import SHARDED_OPTIMIZERS
from memfit.errors import ConfigError
from memfit.optim.adam_mini import AdamMini, block_kind
from memfit.optim.adamw_8bit import AdamW8bit
from memfit.optim.galore import GaLoreAdamW
from memfit.optim.scale import SCALE
from memfit.optim.wrapped import init_optimizer_hooks

LOCAL, OWNER = "local", "owner"
Rule = Callable[[torch.optim.Optimizer, dict, torch.Tensor, str | None], tuple[str, dict[str, Any]]]
"""(optimizer, its group, the global parameter, its name) -> (LOCAL | OWNER, inner-group overrides)."""


# --- where each optimizer's update can run -------------------------------------------------------------------
def rows_aligned(shape: tuple[int, ...], block_size: int) -> bool:
    """8-bit blocks of `block_size` consecutive values never cross a row (so never a dim-0 shard boundary, at any
    world size): the local blocks are then the single-process blocks."""
    return len(shape) >= 2 and (torch.Size(shape).numel() // shape[0]) % block_size == 0


def _eight_bit(p: torch.Tensor, group: dict) -> tuple[str, dict[str, Any]]:
    """Moments quantized iff the *global* parameter is large enough (the state's dtype must not depend on the
    shard size, unlike torchao issue #4912); a local shard is told so by a `min_8bit_size` of 0."""
    if p.numel() < group["min_8bit_size"]:
        return LOCAL, {}
    if rows_aligned(tuple(p.shape), group["block_size"]):
        return LOCAL, {"min_8bit_size": 0}
    return OWNER, {}


def _elementwise(opt, group, p, name):
    return LOCAL, {}


def _adamw_8bit(opt, group, p, name):
    return _eight_bit(p, group)


def _galore(opt, group, p, name):
    """GaLore, Natural GaLore, FRUGAL, APOLLO (subclasses): projected matrices need the whole gradient."""
    if opt._projects(group, p):
        return OWNER, {}
    return _eight_bit(p, group) if group.get("quantize") else (LOCAL, {})


def _scale(opt, group, p, name):
    if group["project"] and p.ndim == 2:
        return (LOCAL, {}) if group["norm_dim"] == 1 else (OWNER, {})  # row norms stay on the shard
    return LOCAL, {}


def _adam_mini(opt, group, p, name):
    return (LOCAL, {}) if block_kind(name or "") in ("adam", "row") else (OWNER, {})


RULES: list[tuple[Callable[[torch.optim.Optimizer], bool], Rule]] = [
    (lambda o: type(o) in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD), _elementwise),
    (lambda o: isinstance(o, AdamW8bit), _adamw_8bit),
    (lambda o: isinstance(o, GaLoreAdamW), _galore),
    (lambda o: isinstance(o, SCALE), _scale),
    (lambda o: isinstance(o, AdamMini), _adam_mini),
]
"""How each optimizer's update decomposes over dim-0 shards; an optimizer not listed is refused."""


def rule_for(optimizer: torch.optim.Optimizer) -> Rule:
    for matches, rule in RULES:
        if matches(optimizer):
            return rule
    raise ConfigError(f"optimizer {type(optimizer).__name__} has no FSDP2 placement rule; use one of "
                      f"{', '.join(SHARDED_OPTIMIZERS)} (or run on one process)")


# --- the adapter ----------------------------------------------------------------------------------------------
@dataclass
class Slot:
    """One parameter: the DTensor the model owns, the plain proxy the inner optimizer steps, and where."""

    param: DTensor
    proxy: nn.Parameter
    name: str
    placement: str
    owner: int  # group rank that steps an owner parameter (this rank for local ones)
    inner_group: dict
    overrides: dict  # inner-group keys set per shard (not copied from the user's group)


def per_row(full_shape, rows: int) -> bool:
    """A state tensor with a whole number of entries per parameter row (moments, 8-bit codes and block scales,
    per-row second moments): its canonical form is (rows, -1), sharded like the parameter."""
    return len(full_shape) >= 1 and full_shape[0] % rows == 0


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=like.dtype, device=like.device)


class ShardedOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer built over a `fully_shard`-ed model's parameters (before its first step)."""

    shards_state = True  # each rank holds its rows' state in `slots` (read by `optim.offload`, which sits below)

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        # The Optimizer base __init__ is not called: groups are the wrapped optimizer's original ones.
        rule = rule_for(optimizer)
        if any(optimizer.state.values()):
            raise ConfigError("wrap the optimizer with ShardedOptimizer before its first step")
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        init_optimizer_hooks(self)  # memory trackers label optimizer-step tensors with them
        self._patch_step_function()
        names = {id(p): n for n, p in model.named_parameters()}
        params = [p for g in self.param_groups for p in g["params"]]
        meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
        if len(params) == 0 or len(meshes) != 1 or not all(isinstance(p, DTensor) for p in params):
            raise ConfigError("ShardedOptimizer needs the parameters of one fully_shard-ed model (all DTensors on "
                              "one mesh); shard the model with memfit.distributed.shard_model first")
        self.mesh = meshes.pop()
        if self.mesh.ndim != 1:
            raise ConfigError(f"ShardedOptimizer supports a 1-D device mesh, got {self.mesh.ndim}-D")
        self.group = self.mesh.get_group()
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.exchange = RowExchange(self.group)
        self.slots: dict[int, Slot] = {}
        inner_groups: list[dict] = []
        load = [0] * self.world  # values of the owner matrices assigned to each rank
        for group in self.param_groups:
            group_names = group.get("names") or [None] * len(group["params"])
            split: dict[tuple, dict] = {}
            for p, gname in zip(group["params"], group_names):
                name = names.get(id(p))
                if name is None:
                    raise ConfigError("an optimizer parameter is not a parameter of the given model")
                if tuple(p.placements) != (Shard(0),):
                    raise ConfigError(f"parameter '{name}' is placed {p.placements}; ShardedOptimizer needs "
                                      "FSDP2's dim-0 sharding (Shard(0))")
                check_layout(p, self.world, self.rank)
                placement, overrides = rule(optimizer, group, p, gname or name)
                if p.ndim == 0 or p.shape[0] < self.world:
                    placement, overrides = OWNER, {}  # no empty shards
                if self.world == 1:
                    placement, overrides = LOCAL, {}  # the shard is the whole tensor
                owner = self.rank
                if placement == OWNER:  # the least-loaded rank so far (same answer on every rank)
                    owner = min(range(self.world), key=lambda r: (load[r], r))
                    load[owner] += p.numel()
                key = tuple(sorted(overrides.items()))
                if key not in split:
                    split[key] = {**{k: v for k, v in group.items() if k not in ("params", "names")}, **overrides,
                                  "params": [], "names": [] if "names" in group else None}
                    inner_groups.append(split[key])
                inner = split[key]
                proxy = nn.Parameter(_empty(p), requires_grad=p.requires_grad)
                inner["params"].append(proxy)
                if inner["names"] is not None:
                    inner["names"].append(gname)
                self.slots[id(p)] = Slot(p, proxy, name, placement, owner, inner, overrides)
        for inner in inner_groups:
            if inner["names"] is None:
                del inner["names"]
        optimizer.param_groups = inner_groups

    # --- the surface a train loop / LR scheduler / layer-wise wrapper uses ----------------------------------
    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

    def __repr__(self) -> str:
        return f"ShardedOptimizer({self.optimizer!r}, world={self.world})"

    def holds(self, slot: Slot) -> bool:
        """True where this rank keeps `slot`'s optimizer state (its shard's, or the whole matrix's as owner)."""
        return slot.placement == LOCAL or slot.owner == self.rank

    # --- state dict: keyed by parameter name, tensors in a layout that does not depend on the world size ----
    def state_dict(self) -> dict[str, Any]:
        """`{"state": {fqn: {key: value}}, "shapes": {fqn: {key: shape}}, "param_groups": [...]}`.

        Each state tensor is stored in its *canonical* form — the single-process tensor, viewed as (rows, -1)
        when it has one entry per parameter row group — as a DTensor sharded on dim 0 where this rank holds a
        shard, or as a plain tensor where it holds the whole one (owner, one rank, or a scalar). `shapes` keeps
        each tensor's single-process shape. Every rank returns what it holds; names and shapes agree."""
        state, shapes = {}, {}
        for slot in self.slots.values():
            entries = self.optimizer.state.get(slot.proxy)
            if not entries or not self.holds(slot):
                continue
            state[slot.name], shapes[slot.name] = {}, {}
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    value, full_shape = self._canonical(slot, key, value)
                    shapes[slot.name][key] = list(full_shape)
                state[slot.name][key] = value
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [self.slots[id(p)].name for p in g["params"]]} for g in self.param_groups]
        return {"state": state, "shapes": shapes, "param_groups": groups}

    def _canonical(self, slot: Slot, key: str, value: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        rows, held = slot.param.shape[0], self._rows_held(slot)
        full_shape = tuple(value.shape)
        if value.dim() >= 1 and value.shape[0] % held == 0:
            full_shape = (value.shape[0] * rows // held, *value.shape[1:])
        if per_row(full_shape, rows):
            rowwise = value.reshape(held, -1)
            if held == rows:
                return rowwise, full_shape
            return DTensor.from_local(rowwise, self.mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size((rows, rowwise.shape[1])),
                                      stride=(rowwise.shape[1], 1)), full_shape
        if held == rows or value.dim() == 0:
            return value, full_shape
        raise RuntimeError(f"state '{key}' {tuple(value.shape)} of '{slot.name}' is neither per-row nor whole "
                           f"on this shard of {held} rows; its optimizer's FSDP2 rule is wrong")

    def _rows_held(self, slot: Slot) -> int:
        return slot.param.to_local().shape[0] if slot.placement == LOCAL else slot.param.shape[0]

    def state_templates(self, shapes: dict[str, dict[str, list[int]]],
                        dtypes: dict[str, dict[str, str]]) -> dict[str, dict[str, torch.Tensor]]:
        """Empty canonical tensors (as `state_dict` gives them) for the state this rank will hold, to load into."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for slot in self.slots.values():
            if slot.name not in shapes or not self.holds(slot):
                continue
            device = slot.param.device
            out[slot.name] = {}
            for key, full_shape in shapes[slot.name].items():
                dtype = getattr(torch, dtypes[slot.name][key])
                rows, held = slot.param.shape[0], self._rows_held(slot)
                if per_row(full_shape, rows):
                    width = math.prod(full_shape) // rows
                    local = torch.zeros((held, width), dtype=dtype, device=device)
                    out[slot.name][key] = local if held == rows else DTensor.from_local(
                        local, self.mesh, [Shard(0)], run_check=False, shape=torch.Size((rows, width)),
                        stride=(width, 1))
                else:
                    out[slot.name][key] = torch.zeros(full_shape, dtype=dtype, device=device)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of `state_dict` (canonical tensors, e.g. filled by `state_templates` + DCP), for any world size:
        each rank keeps its rows of per-row state, owners the whole tensors."""
        for slot in self.slots.values():
            self.optimizer.state.pop(slot.proxy, None)
            entries = state_dict["state"].get(slot.name)
            if entries is None or not self.holds(slot):
                continue
            shapes = state_dict["shapes"].get(slot.name, {})
            restored = {}
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    value = value.to_local() if isinstance(value, DTensor) else value
                    full_shape, rows, held = shapes[key], slot.param.shape[0], self._rows_held(slot)
                    if per_row(full_shape, rows):
                        value = value.reshape(full_shape[0] * held // rows, *full_shape[1:])
                restored[key] = value
            self.optimizer.state[slot.proxy] = restored
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for key, value in saved.items():
                if key not in ("params", "names"):
                    group[key] = tuple(value) if isinstance(group.get(key), tuple) else value

    # --- the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = [(group, self.slots[id(p)]) for group in self.param_groups for p in group["params"]
                  if p.grad is not None]
        for group, slot in active:
            _sync(group, slot)
        local = [slot for _, slot in active if slot.placement == LOCAL]
        with self._bound([(s, s.param.to_local(), s.param.grad.to_local()) for s in local]):
            self.optimizer.step()
        owned = [slot for _, slot in active if slot.placement == OWNER]
        for window in _windows(owned, self.world):
            self._step_window(window)
        return loss

    def _step_window(self, window: list[Slot]) -> None:
        items = [(s.param.to_local(), s.param.shape[0], s.owner) for s in window]
        grads = [(s.param.grad.to_local(), s.param.shape[0], s.owner) for s in window]
        full_params = self.exchange.gather(items)
        full_grads = self.exchange.gather(grads)
        mine = [(window[i], full_params[i], full_grads[i]) for i in full_params]
        with self._bound(mine):
            self.optimizer.step()
        self.exchange.scatter(items, full_params)

    @staticmethod
    def _bound(bindings: list[tuple[Slot, torch.Tensor, torch.Tensor]]):
        return _Bound(bindings)


def _sync(outer: dict, slot: Slot) -> None:
    """Hyper-parameters (lr from a scheduler, ...) flow from the groups users see into the inner ones."""
    for key, value in outer.items():
        if key not in ("params", "names") and key not in slot.overrides:
            slot.inner_group[key] = value


class _Bound:
    """Points proxies at (shard or gathered) data and gradient for one inner step, then lets go of both."""

    def __init__(self, bindings: list[tuple[Slot, torch.Tensor, torch.Tensor]]) -> None:
        self.bindings = bindings

    def __enter__(self) -> None:
        for slot, data, grad in self.bindings:
            slot.proxy.data = data
            slot.proxy.grad = grad

    def __exit__(self, *exc: object) -> None:
        for slot, data, _ in self.bindings:
            slot.proxy.grad = None
            slot.proxy.data = _empty(data)


def _windows(slots: list[Slot], world: int) -> Iterator[list[Slot]]:
    """Consecutive runs of owner slots with distinct owners (each rank steps at most one matrix per window)."""
    window: list[Slot] = []
    for slot in slots:
        if any(s.owner == slot.owner for s in window) or len(window) == world:
            yield window
            window = []
        window.append(slot)
    if window:
        yield window


def shard_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> ShardedOptimizer:
    """`ShardedOptimizer(optimizer, model)`; a `memfit.optim.layerwise.LayerwiseOptimizer` is wrapped inside out
    (its hooks must sit on the DTensor parameters FSDP2 calls them on)."""
    from memfit.optim.layerwise import LayerwiseOptimizer

    if isinstance(optimizer, LayerwiseOptimizer):
        raise ConfigError("shard the inner optimizer first, then make it layer-wise: "
                          "make_layerwise(shard_optimizer(opt, model), model)")
    return ShardedOptimizer(optimizer, model)

