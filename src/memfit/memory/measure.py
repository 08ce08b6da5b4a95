"""Measure where memory goes: tensor bytes by category at the peak, plus the process peak.

Tensor-level attribution is PyTorch's `MemTracker` (a `TorchDispatchMode` with module and optimizer hooks)
— private API, so it stays behind this module. Process-level peak is `memfit.memory.process`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook

from memfit.compat import fail

try:  # private torch API (DESIGN §4): a torch that moved it must say so, not fail somewhere inside
    from torch.distributed._tools import mod_tracker
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
except ImportError as exc:
    raise fail("memfit's memory meter cannot import torch's MemTracker",
               "torch.distributed._tools.mem_tracker.MemTracker and _MemRefType", ("torch",)) from exc

from memfit.memory import process
from memfit.memory.breakdown import CATEGORIES, TENSOR_CATEGORIES, MemoryBreakdown, format_bytes

_CATEGORY_OF = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "other",
}


def _breakdown(snapshot: dict[Any, int]) -> MemoryBreakdown:
    values = {c: 0 for c in CATEGORIES}
    for reftype, nbytes in snapshot.items():
        if reftype in _CATEGORY_OF:
            values[_CATEGORY_OF[reftype]] += nbytes
    return MemoryBreakdown(**values)


@dataclass
class MemoryReport:
    """What one measured region used: tensor bytes by category at the peak, and the process peak."""

    peak: MemoryBreakdown  # every category at the moment the tensor total peaked
    category_peaks: MemoryBreakdown  # each category's own maximum over the region
    process_peak: int | None = None  # VmHWM (CPU) or max reserved (CUDA), bytes
    process_start: int | None = None  # RSS (CPU) or allocated (CUDA) when the region began
    device: str = "cpu"
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_peak(self) -> int:
        return self.peak.total

    @property
    def overhead(self) -> int | None:
        """Process peak minus tensor peak: interpreter, libraries, allocator slack."""
        return None if self.process_peak is None else self.process_peak - self.tensor_peak

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "peak": self.peak.to_dict(),
            "category_peaks": self.category_peaks.to_dict(),
            "tensor_peak": self.tensor_peak,
            "process_peak": self.process_peak,
            "process_start": self.process_start,
            "overhead": self.overhead,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryReport:
        return cls(
            peak=MemoryBreakdown.from_dict(d["peak"]),
            category_peaks=MemoryBreakdown.from_dict(d["category_peaks"]),
            process_peak=d.get("process_peak"),
            process_start=d.get("process_start"),
            device=d.get("device", "cpu"),
            notes=d.get("notes", {}),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self, estimate: MemoryBreakdown | None = None, title: str = "memory by category",
              estimate_peak: int | None = None):
        """A rich Table: measured at peak and each category's max; with `estimate`, the ratio of each category's
        max to its estimate (estimates are per-category peaks), and of the tensor peak to `estimate_peak`
        (`memfit.memory.estimate.step_peak`) or, without it, to the sum of the categories (an upper bound)."""
        from rich.table import Table

        table = Table(title=title)
        table.add_column("category")
        table.add_column("measured @ peak", justify="right")
        table.add_column("category max", justify="right")
        if estimate is not None:
            table.add_column("estimate", justify="right")
            table.add_column("max/est", justify="right")
        for c in TENSOR_CATEGORIES:
            measured, cmax = getattr(self.peak, c), getattr(self.category_peaks, c)
            est = getattr(estimate, c) if estimate is not None else 0
            if measured == 0 and cmax == 0 and est == 0:
                continue
            row = [c, format_bytes(measured), format_bytes(cmax)]
            if estimate is not None:
                row += [format_bytes(est), f"{cmax / est:.2f}" if est else "-"]
            table.add_row(*row)
        total = ["[bold]tensor total", format_bytes(self.tensor_peak), ""]
        if estimate is not None:
            predicted = estimate_peak if estimate_peak is not None else estimate.total
            ratio = f"{self.tensor_peak / predicted:.2f}" if predicted else "-"
            total += [format_bytes(predicted), ratio]
        table.add_row(*total)
        if self.process_peak is not None:
            runtime = estimate.runtime if estimate is not None else 0
            if runtime and self.device.startswith("cuda"):  # measured: max reserved, which holds no context
                from memfit.memory.runtime import CUDA_CONTEXT

                runtime -= CUDA_CONTEXT
            pad = [""] * (2 if estimate is not None else 0)
            if runtime:
                predicted = (estimate_peak if estimate_peak is not None else estimate.total) + runtime
                table.add_row("runtime (process − tensors)", format_bytes(self.overhead), "", format_bytes(runtime),
                              f"{self.overhead / runtime:.2f}")
                table.add_row("[bold]process peak", format_bytes(self.process_peak), "", format_bytes(predicted),
                              f"{self.process_peak / predicted:.2f}")
            else:
                table.add_row("process peak", format_bytes(self.process_peak), "", *pad)
                table.add_row("  minus tensors", format_bytes(self.overhead), "", *pad)
        return table


# What the meter overrides or reads of MemTracker / ModTracker (private, so checked before every use)
_TRACKER_METHODS = ("_update_snap", "_track_module_params_and_buffers", "_pre_fw_hook", "_pre_bw_hook",
                    "_post_bw_hook", "reset_mod_stats", "track_external", "get_tracker_snapshot")
_TRACKER_ATTRIBUTES = ("_curr_mem_snap", "_param_to_grad_hook_handles", "_mod_tracker", "memory_tracking")


def _check_private_api(tracker: MemTracker) -> None:
    missing = [m for m in _TRACKER_METHODS if not callable(getattr(MemTracker, m, None))]
    missing += [a for a in _TRACKER_ATTRIBUTES if not hasattr(tracker, a)]
    missing += [f"ModTracker.{a}" for a in ("is_bw", "parents", "get_known_fqn")
                if not hasattr(getattr(tracker, "_mod_tracker", None), a)]
    if not callable(getattr(mod_tracker, "register_multi_grad_hook", None)):
        missing.append("mod_tracker.register_multi_grad_hook")
    if missing:
        raise fail(f"memfit's memory meter: torch's MemTracker lacks {', '.join(missing)}",
                   "the MemTracker / ModTracker internals of the tested torch releases", ("torch",))


class _CategoryPeakTracker(MemTracker):
    """MemTracker that also remembers each category's own maximum (MemTracker keeps only the total's)."""

    def __init__(self) -> None:
        super().__init__()
        _check_private_api(self)
        self.category_max: dict[Any, int] = {}
        self.snapshots = 0  # calls of the `_update_snap` override: 0 after a region means it is not called any more
        self.grad_forwards = 0  # module forwards on inputs that require grad (ModTracker hooks their gradients)

    def _update_snap(self, *args, **kwargs) -> None:  # noqa: D401 - private hook of MemTracker
        self.snapshots += 1
        super()._update_snap(*args, **kwargs)
        for snap in self._curr_mem_snap.values():
            for reftype, nbytes in snap.items():
                if nbytes > self.category_max.get(reftype, 0):
                    self.category_max[reftype] = nbytes

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        _skip_frozen(self, module)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        # A step may run the model more than once (zeroth-order ±εz passes, closures); MemTracker refuses a second
        # root forward, so start the module stats over (the tracker-level peaks the meter reports are kept).
        if module in self.memory_tracking and not self._mod_tracker.is_bw \
                and set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)} == {"Global"}:
            self.reset_mod_stats()
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs):
            self.grad_forwards += 1
        super()._pre_fw_hook(module, inputs)

    # A module whose stats were reset above (or that ran only at root level, e.g. a loss head called per chunk)
    # may still fire its backward hooks; its bytes are tracked at tensor level all the same.
    def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
        if module is None or module in self.memory_tracking:
            super()._pre_bw_hook(module, args)

    def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
        if module is None or module in self.memory_tracking:
            super()._post_bw_hook(module, args)


def _first_gradient_hook(tensors, fn, *, mode: str = "all"):
    """`register_multi_grad_hook` for ModTracker that always fires on the first gradient ("any" mode).

    ModTracker registers an "all"-mode hook on every module's inputs to know when the module's backward ended.
    That mode's closure holds each input's autograd node, and the hook is stored on that node, so the pair forms
    a cycle through C++ that the garbage collector cannot see: every leaf tensor a module was called on — and
    its `.grad` — then outlives the step (StreamBP, which calls each layer on detached leaf chunks, appeared to
    grow by five hidden-state tensors per layer under the meter and not without it). The meter only needs the
    engine's backward flag for its categories, not exact module exits, so "any" mode (no node in its closure)
    is enough."""
    return register_multi_grad_hook(tensors, fn, mode="any")


@dataclass
class _HookCount:
    calls: int = 0


@contextmanager
def _leak_free_module_hooks() -> Iterator[_HookCount]:
    """Swap ModTracker's module-level `register_multi_grad_hook` for the "any"-mode one; count its calls, so the
    meter can tell when torch no longer calls it by that name (the swap would then silently do nothing)."""
    count = _HookCount()

    def counted(tensors, fn, *, mode: str = "all"):
        count.calls += 1
        return _first_gradient_hook(tensors, fn, mode=mode)

    original = mod_tracker.register_multi_grad_hook
    mod_tracker.register_multi_grad_hook = counted
    try:
        yield count
    finally:
        mod_tracker.register_multi_grad_hook = original


class _NoHook:
    @staticmethod
    def remove() -> None:
        pass


def _skip_frozen(tracker: MemTracker, module: nn.Module) -> None:
    """MemTracker hooks every parameter's gradient, and a frozen parameter cannot take a hook: mark those done."""
    for p in module.parameters():
        if not p.requires_grad and tracker._param_to_grad_hook_handles.get(p) is None:
            tracker._param_to_grad_hook_handles[p] = (_NoHook, _NoHook)


class MemoryMeter:
    """Measures one or more regions (steps) of a run and reports the worst one.

    >>> meter = MemoryMeter(model, optimizer)
    >>> with meter.region():
    ...     loss = model(**batch).loss; loss.backward(); optimizer.step()
    >>> meter.report().peak.gradients
    """

    def __init__(self, *tracked: nn.Module | torch.optim.Optimizer | torch.Tensor | None,
                 device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else _device_of(tracked)
        self._tracker = _CategoryPeakTracker()
        self._tracker.track_external(*[t for t in tracked if t is not None])
        self._peak: MemoryBreakdown | None = None
        self._process_peak: int | None = None
        self._process_start: int | None = None

    def track(self, *objs: nn.Module | torch.optim.Optimizer | torch.Tensor) -> None:
        """Track objects created after the meter (e.g. an optimizer built lazily)."""
        self._tracker.track_external(*objs)

    @contextmanager
    def region(self) -> Iterator[MemoryMeter]:
        if self._process_start is None:
            self._process_start = _process_now(self.device)
        process.reset_peak(self.device)
        self._tracker.reset_mod_stats()
        tracker = self._tracker
        grad_forwards = tracker.grad_forwards
        with _leak_free_module_hooks() as grad_hooks, tracker, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Module is None")
            yield self
        snap = tracker.get_tracker_snapshot("peak")
        peak = _breakdown(snap.get(self.device, _first(snap)))
        if peak.total > 0 and tracker.snapshots == 0:
            raise fail("memfit's memory meter saw tensors but its per-category peaks never updated",
                       "MemTracker to call `_update_snap` on every allocation", ("torch",))
        if tracker.grad_forwards > grad_forwards and grad_hooks.calls == 0:
            raise fail("memfit's memory meter could not replace ModTracker's gradient hook (leaf inputs and their "
                       "gradients would be over-measured)",
                       "torch.distributed._tools.mod_tracker to call its module-level register_multi_grad_hook",
                       ("torch",))
        if self._peak is None or peak.total > self._peak.total:
            self._peak = peak
        proc = process.peak(self.device)
        if proc is not None:
            self._process_peak = max(self._process_peak or 0, proc)

    def current(self) -> MemoryBreakdown:
        """Live tensor bytes by category right now (inside or between regions)."""
        snap = self._tracker.get_tracker_snapshot("current")
        return _breakdown(snap.get(self.device, _first(snap)))

    def report(self, **notes: Any) -> MemoryReport:
        if self._peak is None:
            raise RuntimeError("MemoryMeter.report() called before any region() was measured")
        return MemoryReport(
            peak=self._peak,
            category_peaks=_breakdown(self._tracker.category_max),
            process_peak=self._process_peak,
            process_start=self._process_start,
            device=str(self.device),
            notes=notes,
        )


def measure(fn: Callable[[], Any], *tracked: nn.Module | torch.optim.Optimizer | torch.Tensor | None,
            repeat: int = 1) -> tuple[Any, MemoryReport]:
    """Run `fn` `repeat` times under a fresh meter; return its last result and the worst region's report."""
    meter = MemoryMeter(*tracked)
    result = None
    for _ in range(repeat):
        with meter.region():
            result = fn()
    return result, meter.report()


def _first(snap: dict) -> dict:
    return next(iter(snap.values()), {})


def _device_of(tracked) -> torch.device:
    for obj in tracked:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                return p.device
        if isinstance(obj, torch.Tensor):
            return obj.device
    return torch.device("cpu")


def _process_now(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return process.current_rss()


def state_bytes(optimizer: torch.optim.Optimizer, *extra: Any) -> int:
    """Bytes held in an optimizer's per-parameter state (what the optimizer slot's `estimate()` predicts), plus
    `extra` tensors it keeps elsewhere (a reference package's own attributes)."""
    return storage_bytes(dict(optimizer.state) if hasattr(optimizer, "state") else {}, *extra)


def storage_bytes(*values: Any, depth: int = 6) -> int:
    """Bytes of the distinct tensor storages reachable from `values`, each counted once (views and shared tensors
    are not double counted). Walks nested containers, the attributes of helper objects (galore-torch and
    apollo-torch keep their projection matrices on projector objects in the state) and tensor subclasses through
    `__tensor_flatten__` (torchao's quantized optimizer state, DTensor)."""
    seen: set[tuple[int, torch.device]] = set()
    total = 0

    def visit(value: Any, depth: int) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor and type(value) is not nn.Parameter \
                    and hasattr(value, "__tensor_flatten__"):
                for name in value.__tensor_flatten__()[0]:
                    visit(getattr(value, name), depth)
                return
            storage = value.untyped_storage()
            key = (storage.data_ptr(), value.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif depth == 0:
            return
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth - 1)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth - 1)
        elif hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.optim.Optimizer, type)):
            for v in vars(value).values():
                visit(v, depth - 1)

    for value in values:
        visit(value, depth)
    return total
