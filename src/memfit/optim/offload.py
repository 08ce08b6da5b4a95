"""Optimizer state on disk — after ZeRO-Infinity (Rajbhandari et al. 2021, "ZeRO-Infinity: Breaking the GPU Memory
Wall for Extreme Scale Deep Learning": optimizer state on NVMe, streamed through a bounded buffer) and Fuyou (Liao
et al. 2024, "Adding NVMe SSDs to Enable and Accelerate 100B Model Fine-tuning on a Single GPU": the optimizer
step overlapped with the SSD traffic).

    optimizer: {name: adamw, offload: disk}

The trained parameters are split into *units* — each decoder block (FSDP2's units), and each parameter outside
the blocks on its own (`offload_units`). A unit's whole optimizer state (moments, 8-bit codes and scales, step
counters, projectors: every tensor in the optimizer's per-parameter state) lives in one memory-mapped file,
`<run dir>/optimizer-state/unit-NNNN.bin` (a temporary folder without a run dir; `rank-R/` per rank under
FSDP2). The step runs unit by unit: the unit's state is put into the optimizer as tensors *viewing the file*,
the optimizer's own `step` updates them in place (bit-equal to the in-memory step: the same kernel on the same
values), the unit's mapped pages are released (`madvise(MADV_DONTNEED)`: the dirty pages stay in the page cache
and the kernel writes them back), and meanwhile a background thread has mapped the next unit's pages in, writable
(`MADV_POPULATE_WRITE`: read from disk where evicted; before Linux 5.14 one write per page). So the process holds
at most two units' state at a time (the first step, which creates each unit's state in memory and then copies it
into its file: two copies of one unit). Measured (`memfit bench distributed`, docs/benchmarks.md): the process
peak falls by the offloaded bytes minus that staging; the optimizer step itself runs ~5x slower (page faults and
write-back of the whole state every step), which a training step at a useful batch mostly hides.

Any optimizer whose update runs in `step()` and keeps per-parameter state works (memfit's AdamW, 8-bit AdamW,
Adam-mini, GaLore family, APOLLO, FRUGAL, SCALE, SGD), plain or wrapped in `memfit.distributed.optim`'s
`ShardedOptimizer` (each rank offloads the state it holds). Refused: layer-wise updates (inside backward; LOMO and
AdaLomo have no `offload` key), 16-bit weight storage / `state_dtype` (the precision wrapper re-creates state per
step), CUDA parameters (the state would have to be staged on the device; not built).

Files are created under a temporary name and renamed once complete; a unit whose state changes layout gets a new
file the same way. They are memfit's only (a stale `optimizer-state/` of a crashed run is cleared when the run
starts again) and are deleted by `close()` (the train loop calls it; at exit otherwise). A checkpoint holds the
state like any other (`state_dict` returns views of the files, which the checkpoint writer copies): resume is
exact, and costs one copy of the whole state in memory while a checkpoint is written or loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.sharding import block_names
from memfit.memory.spec import RunSpec
from memfit.optim.wrapped import WrappedOptimizer, WrappedTechnique
from memfit.techniques.base import Context, OptimizerTechnique

STATE_DIR = "optimizer-state"
"""The folder under a run directory that holds the state files (`memfit.rundir.RUN_FILES` lists it)."""
ALIGN = 64  # bytes: each state tensor starts on a cache line inside its unit's file
PAGE = mmap.PAGESIZE
MADV_POPULATE_WRITE = 23  # Linux >= 5.14 (not in Python 3.11's mmap module)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if os.name == "posix" else None


def offload_units(names: Sequence[str]) -> list[list[str]]:
    """Parameter names grouped into offload units, in order: each block (`memory.sharding.block_names`), then
    every parameter outside the blocks on its own (embeddings and head are as large as several blocks)."""
    blocks = block_names(names)
    grouped: dict[str, list[str]] = {b: [] for b in blocks}
    root: list[list[str]] = []
    for name in names:
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is None:
            root.append([name])
        else:
            grouped[block].append(name)
    return [g for g in grouped.values() if g] + root


# --- one unit's file ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    """Where one state tensor lives in its unit's file."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _UnitFile:
    """A unit's state: per parameter, its state dict with every tensor replaced by a `_Slot` in one mapped file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mm: mmap.mmap | None = None
        self.templates: dict[int, dict[str, Any]] = {}  # parameter index in the unit -> state with _Slots

    @property
    def nbytes(self) -> int:
        return len(self.mm) if self.mm is not None else 0

    def view(self, slot: _Slot) -> torch.Tensor:
        if slot.nbytes == 0:
            return torch.empty(slot.shape, dtype=slot.dtype)
        flat = torch.frombuffer(self.mm, dtype=slot.dtype, count=_numel(slot.shape), offset=slot.offset)
        return flat.view(slot.shape)

    def states(self) -> dict[int, dict[str, Any]]:
        """Each parameter's state with fresh views of the file (they die with the step that uses them)."""
        return {i: {k: self.view(v) if isinstance(v, _Slot) else v for k, v in t.items()}
                for i, t in self.templates.items()}

    def store(self, states: dict[int, dict[str, Any]]) -> None:
        """Take the unit's state after a step: tensors the optimizer updated in place are already in the file;
        replaced ones are copied into their slot; a new layout (first step, a resize) gets a new file."""
        layout = {i: {k: (v.dtype, tuple(v.shape)) for k, v in st.items() if isinstance(v, torch.Tensor)}
                  for i, st in states.items()}
        current = {i: {k: (v.dtype, v.shape) for k, v in t.items() if isinstance(v, _Slot)}
                   for i, t in self.templates.items()}
        for st in states.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and (type(v) is not torch.Tensor or v.device.type != "cpu"):
                    raise ConfigError(f"optimizer state '{k}' is a {type(v).__name__} on {v.device}; "
                                      "optimizer.offload: disk keeps plain CPU tensors only")
        if layout != current or self.mm is None and any(layout.values()):
            self._rewrite(states)
            return
        base = self._base()
        for i, st in states.items():
            template = self.templates[i]
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    slot = template[k]
                    if slot.nbytes and v.data_ptr() != base + slot.offset:  # replaced, not updated in place
                        self.view(slot).copy_(v)
            self.templates[i] = {k: template[k] if isinstance(v, torch.Tensor) else v for k, v in st.items()}

    def _base(self) -> int:
        if self.mm is None:
            return 0
        first = torch.frombuffer(self.mm, dtype=torch.uint8, count=1)
        address = first.data_ptr()
        del first
        return address

    def _rewrite(self, states: dict[int, dict[str, Any]]) -> None:
        templates: dict[int, dict[str, Any]] = {}
        offset = 0
        for i, st in states.items():
            templates[i] = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    templates[i][k] = _Slot(offset, v.dtype, tuple(v.shape))
                    offset += -(-v.nbytes // ALIGN) * ALIGN
                else:
                    templates[i][k] = v
        size = max(offset, 1)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w+b") as f:
            f.truncate(size)
            mm = mmap.mmap(f.fileno(), size)
        new = _UnitFile(self.path)
        new.mm, new.templates = mm, templates
        for i, st in states.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.numel():
                    new.view(templates[i][k]).copy_(v)
        os.replace(tmp, self.path)  # the name only ever holds a complete file
        old = self.mm
        self.mm, self.templates = mm, templates
        if old is not None:
            _close(old)

    def release(self) -> None:
        """Drop the unit's pages from this process (they stay in the page cache, dirty ones written back)."""
        if self.mm is not None:
            self.mm.madvise(mmap.MADV_DONTNEED)

    def prefetch(self) -> None:
        """Map the unit's pages in, writable, ahead of its step (read from disk where the kernel evicted them)."""
        if self.mm is None:
            return
        if _madvise(self._base(), len(self.mm), MADV_POPULATE_WRITE) != 0:  # before Linux 5.14: touch each page
            self.mm.madvise(mmap.MADV_WILLNEED)
            pages = torch.frombuffer(self.mm, dtype=torch.uint8)[::PAGE]
            pages.add_(0)  # writes each page's first byte back onto itself; torch releases the GIL meanwhile
            del pages


def _madvise(address: int, length: int, advice: int) -> int:
    """libc `madvise` through ctypes, which releases the GIL (Python's `mmap.madvise` holds it, stalling the
    step that the prefetch should overlap). Returns 0 on success."""
    if _LIBC is None:
        return -1
    return _LIBC.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), ctypes.c_int(advice))


def _close(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view is still alive somewhere (a state_dict kept by a caller): closes when it dies
        pass


class _Files:
    """Every unit's file and the folder; cleaned up by `close()` or when the optimizer is collected / at exit."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.owned_folder = False  # a temporary folder memfit made (removed whole)
        self.units: dict[int, _UnitFile] = {}

    def unit(self, u: int) -> _UnitFile:
        if u not in self.units:
            if self.folder is None:
                self.folder, self.owned_folder = Path(tempfile.mkdtemp(prefix="memfit-optimizer-state-")), True
            self.folder.mkdir(parents=True, exist_ok=True)
            self.units[u] = _UnitFile(self.folder / f"unit-{u:04d}.bin")
        return self.units[u]

    def close(self) -> None:
        for f in self.units.values():
            if f.mm is not None:
                _close(f.mm)
                f.mm = None
            f.path.unlink(missing_ok=True)
            f.path.with_name(f".{f.path.name}.tmp").unlink(missing_ok=True)
        self.units.clear()
        if self.folder is not None:
            if self.owned_folder:
                shutil.rmtree(self.folder, ignore_errors=True)
            else:
                _remove_empty(self.folder)
                if self.folder.parent.name == STATE_DIR:  # rank-R/ under a run's optimizer-state/
                    _remove_empty(self.folder.parent)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def clear_stale(folder: Path) -> None:
    """Remove the state files a crashed run left in `folder` (memfit's names only)."""
    if folder.is_dir():
        for path in list(folder.glob("unit-*.bin")) + list(folder.glob(".unit-*.bin.tmp")):
            path.unlink(missing_ok=True)


# --- the optimizer --------------------------------------------------------------------------------------------
class DiskStateOptimizer(WrappedOptimizer):
    """Runs `optimizer` one unit at a time with the unit's state in a memory-mapped file (module docstring).

    `optimizer` is a plain optimizer over `model`'s parameters or a `ShardedOptimizer` (FSDP2); `folder` is where
    the files go (default: a temporary folder; `use_folder` sets it before the first step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, folder: Path | str | None = None,
                 prefetch: bool = True) -> None:
        from memfit.optim.layerwise import LayerwiseOptimizer
        from memfit.optim.precision import PrecisionOptimizer

        if isinstance(optimizer, (LayerwiseOptimizer, PrecisionOptimizer)):
            raise ConfigError(f"optimizer.offload: disk steps whole units; {type(optimizer).__name__} steps inside "
                              "backward or per parameter: drop layerwise / state_dtype / 16-bit weights, or offload")
        super().__init__(optimizer)
        self._patch_step_function()  # step hooks (memory trackers) work as on any torch optimizer
        self.sharded = getattr(optimizer, "shards_state", False)  # distributed.optim.ShardedOptimizer
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(p.device.type != "cpu" for p in params):
            raise ConfigError("optimizer.offload: disk updates the state on the host; this run's parameters are on "
                              f"{next(p.device for p in params if p.device.type != 'cpu')} (not built for "
                              "accelerators yet): remove optimizer.offload")
        ids = {id(p) for p in params}
        by_name = {n: p for n, p in model.named_parameters() if id(p) in ids}
        if len(by_name) != len(ids):
            raise ConfigError("optimizer.offload: disk needs an optimizer over the given model's parameters")
        self.units: list[list[torch.Tensor]] = [[by_name[n] for n in unit] for unit in offload_units(list(by_name))]
        self.files = _Files()
        if folder is not None:
            self.use_folder(folder)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfit-prefetch") if prefetch else None
        self._finalizer = weakref.finalize(self, _shutdown, self.files, self._pool)

    def use_folder(self, folder: Path | str) -> None:
        """Put the state files in `folder` (before any exist); stale files of a crashed run there are removed."""
        if self.files.units:
            raise RuntimeError("the optimizer state files already exist; set their folder before the first step")
        folder = Path(folder)
        if self.sharded:
            folder = folder / f"rank-{self.optimizer.rank}"
        clear_stale(folder)
        self.files.folder, self.files.owned_folder = folder, False

    @property
    def folder(self) -> Path | None:
        return self.files.folder

    @property
    def state(self):
        """The state held in memory (none between steps); `pop(p)` also drops `p`'s state on disk (LISA and
        BAdam free a deactivated layer's state so)."""
        return _StateView(self)

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    def _forget(self, p: torch.Tensor) -> bool:
        for u, unit in enumerate(self.units):
            for i, q in enumerate(unit):
                if q is p and u in self.files.units:
                    return self.files.units[u].templates.pop(i, None) is not None
        return False

    def offloaded_bytes(self) -> int:
        """Bytes of optimizer state in files now."""
        return sum(f.nbytes for f in self.files.units.values())

    def close(self) -> None:
        """Delete the state files (the optimizer is unusable afterwards)."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"DiskStateOptimizer({self.optimizer!r}, units={len(self.units)}, folder={self.folder})"

    # --- the inner optimizer's per-parameter state, unit by unit --------------------------------------------
    def _key(self, p: torch.Tensor) -> torch.Tensor:
        return self.optimizer.slots[id(p)].proxy if self.sharded else p

    def _install(self, u: int) -> None:
        """The unit's state into the inner optimizer (views of its file)."""
        if u not in self.files.units:
            return
        params, inner = self.units[u], self.optimizer.state
        for i, st in self.files.units[u].states().items():
            inner[self._key(params[i])] = st

    def _take(self, u: int) -> None:
        """The unit's state out of the inner optimizer, into its file; then its pages out of this process."""
        inner = self.optimizer.state
        states = {}
        for i, p in enumerate(self.units[u]):
            st = inner.pop(self._key(p), None)
            if st:
                states[i] = st
        if states or u in self.files.units:
            f = self.files.unit(u)
            f.store(states)
            f.release()

    def _prefetch(self, u: int) -> Future | None:
        f = self.files.units.get(u)
        if self._pool is None or f is None:
            return None
        return self._pool.submit(f.prefetch)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = {p: p.grad for unit in self.units for p in unit}
        for p in grads:
            p.grad = None
        order = [u for u, unit in enumerate(self.units) if any(grads[p] is not None for p in unit)]
        pending = self._prefetch(order[0]) if order else None
        try:
            for j, u in enumerate(order):
                if pending is not None:
                    pending.result()
                pending = self._prefetch(order[j + 1]) if j + 1 < len(order) else None
                self._install(u)
                for p in self.units[u]:
                    p.grad = grads[p]
                try:
                    self.optimizer.step()
                finally:
                    for p in self.units[u]:
                        p.grad = None
                    self._take(u)
        finally:
            if pending is not None:
                pending.result()
            for p, g in grads.items():
                p.grad = g
        return loss

    # --- checkpoints: the inner optimizer's own format ---------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's `state_dict`, its tensors viewing the state files (copy them before the next
        step: the checkpoint writers do)."""
        for u in range(len(self.units)):
            self._install(u)
        try:
            return self.optimizer.state_dict()
        finally:
            for unit in self.units:
                for p in unit:
                    self.optimizer.state.pop(self._key(p), None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as the inner optimizer does, then move each unit's state into its file."""
        self.optimizer.load_state_dict(state_dict)
        for u in range(len(self.units)):
            self._take(u)


class _StateView(dict):
    """`DiskStateOptimizer.state`: the inner optimizer's state in memory; `pop` frees a parameter's state in memory
    and on disk (its file region is reclaimed when the unit's file is next rewritten)."""

    def __init__(self, owner: DiskStateOptimizer) -> None:
        super().__init__(owner.optimizer.state)
        self.owner = owner

    def pop(self, p, default=None):
        on_disk = self.owner._forget(p)
        held = self.owner.optimizer.state.pop(self.owner._key(p), None)
        return held if held is not None else ({} if on_disk else default)


def _shutdown(files: _Files, pool: ThreadPoolExecutor | None) -> None:
    if pool is not None:
        pool.shutdown(wait=True)
    files.close()


def use_run_dir(optimizer: torch.optim.Optimizer | None, run_dir: Path | None) -> None:
    """Point a disk-offloaded optimizer's files at `run_dir/optimizer-state` (no-op for any other optimizer)."""
    if isinstance(optimizer, DiskStateOptimizer) and run_dir is not None:
        optimizer.use_folder(Path(run_dir) / STATE_DIR)


def close(optimizer: torch.optim.Optimizer | None) -> None:
    """Delete a disk-offloaded optimizer's files (no-op for any other optimizer)."""
    if isinstance(optimizer, DiskStateOptimizer):
        optimizer.close()


# --- the technique ------------------------------------------------------------------------------------------
class DiskOffloadTechnique(WrappedTechnique):
    """The recipe's optimizer technique with `offload: disk`: its optimizer wrapped in `DiskStateOptimizer`; its
    memory story: no optimizer state held but the units being stepped (`staged_bytes`)."""

    def __init__(self, inner: OptimizerTechnique) -> None:
        if getattr(inner.config, "layerwise", False):
            raise ConfigError(f"optimizer '{inner.name}' updates inside backward (layer-wise), where its state is "
                              "needed parameter by parameter; optimizer.offload: disk steps whole units after "
                              "backward: use a whole-step optimizer or offload: none")
        super().__init__(inner)

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        return self.wrap(self.inner.build_optimizer(ctx), ctx.model)

    @staticmethod
    def wrap(optimizer: torch.optim.Optimizer, model: nn.Module) -> DiskStateOptimizer:
        return DiskStateOptimizer(optimizer, model)

    def unit_state_bytes(self, spec: RunSpec) -> list[int]:
        """The inner optimizer's state of each offload unit (its own estimate on that unit's parameters)."""
        trainable = {p.name: p for p in spec.model.trainable}
        out = []
        for names in offload_units(list(trainable)):
            unit = tuple(trainable[n] for n in names)
            sub = spec.with_(model=replace(spec.model, params=unit))
            out.append(self.inner.estimate(sub, MemoryBreakdown()).optimizer)
        return out

    def staged_bytes(self, spec: RunSpec) -> int:
        """State in memory at worst: a unit and the next one prefetched, or a unit's first step (its state made in
        memory, then copied into its file)."""
        units = self.unit_state_bytes(spec)
        return max((a + max(a, b) for a, b in zip(units, units[1:] + [0])), default=0)

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        inner = self.inner.transform_spec(spec)
        return inner.with_(extra={**inner.extra, "optimizer_offloaded": sum(self.unit_state_bytes(spec))})

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        return self.inner.estimate(spec, base).with_(optimizer=self.staged_bytes(spec))
