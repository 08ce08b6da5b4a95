"""Per-rank memory, measured: tensor bytes by category on this rank under FSDP2, plus the process peak.

Tensor attribution is torch's `FSDPMemTracker` (private API, like the `MemTracker` behind
`memfit.memory.measure.MemoryMeter`): it tells sharded from unsharded (gathered) parameters and gradients and
labels FSDP2's all-gather outputs and reduce-scatter inputs, which the plain meter cannot — it sees the gathered
blocks as parameters and the communication buffers as activations or temporaries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType

from memfit.memory import process
from memfit.memory.breakdown import MemoryBreakdown
from memfit.optim.layerwise import LayerwiseOptimizer

FSDP_CATEGORIES = {
    _FSDPRefType.SHARDED_PARAM: "sharded_params",
    _FSDPRefType.UNSHARDED_PARAM: "unsharded_params",
    _FSDPRefType.BUFFER: "buffers",
    _FSDPRefType.SHARDED_GRAD: "sharded_grads",
    _FSDPRefType.UNSHARDED_GRAD: "unsharded_grads",
    _FSDPRefType.ACT: "activations",
    _FSDPRefType.TEMP: "temporaries",
    _FSDPRefType.ALL_GATHER: "all_gather",
    _FSDPRefType.REDUCE_SCATTER: "reduce_scatter",
    _FSDPRefType.OPT: "optimizer",
    _FSDPRefType.INP: "inputs",
}
MEMFIT_CATEGORY = {
    "sharded_params": "parameters", "unsharded_params": "parameters", "buffers": "buffers",
    "sharded_grads": "gradients", "unsharded_grads": "gradients", "activations": "activations",
    "inputs": "activations", "temporaries": "temporaries", "optimizer": "optimizer",
    "all_gather": "other", "reduce_scatter": "other",
}
"""FSDP categories folded into memfit's (communication buffers go to `other`)."""


MODEL_STATE = ("sharded_params", "unsharded_params", "sharded_grads", "unsharded_grads", "optimizer",
               "all_gather", "reduce_scatter")
"""What ZeRO shards (parameters, gradients, optimizer state) plus the gathered blocks and buffers in flight."""


@dataclass
class RankReport:
    """One rank's worst region: FSDP categories at the tensor peak, and the process peak."""

    rank: int
    peak: dict[str, int]  # FSDP category -> bytes at the moment the tensor total peaked
    state_peak: dict[str, int]  # the same at the moment parameters + gradients + optimizer state + buffers peaked
    held: dict[str, int]  # FSDP category -> bytes at the end of the last region (what persists between steps)
    process_peak: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_peak(self) -> int:
        return sum(self.peak.values())

    @property
    def model_state_peak(self) -> int:
        return sum(self.state_peak[c] for c in MODEL_STATE)

    def breakdown(self) -> MemoryBreakdown:
        values: dict[str, int] = {}
        for category, nbytes in self.peak.items():
            values[MEMFIT_CATEGORY[category]] = values.get(MEMFIT_CATEGORY[category], 0) + nbytes
        return MemoryBreakdown(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "peak": self.peak, "state_peak": self.state_peak, "held": self.held,
                "tensor_peak": self.tensor_peak, "model_state_peak": self.model_state_peak,
                "process_peak": self.process_peak, "notes": self.notes}


def _categories(device_snap: dict) -> dict[str, int]:
    return {name: int(device_snap.get(ref, 0)) for ref, name in FSDP_CATEGORIES.items()}


class _Tracker(FSDPMemTracker):
    """FSDPMemTracker that also keeps the moment the model state (`MODEL_STATE`) peaked."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.state_peak: dict[str, int] = {}

    def _update_snap(self, *args: Any, **kwargs: Any) -> None:  # private hook of MemTracker
        super()._update_snap(*args, **kwargs)
        for device_snap in self._curr_mem_snap.values():
            now = _categories(device_snap)
            if sum(now[c] for c in MODEL_STATE) > sum(self.state_peak.get(c, 0) for c in MODEL_STATE):
                self.state_peak = now


class RankMeter:
    """Measures regions (train steps) of one rank of an FSDP2 run; the report is the worst region's peak.

    `optimizer` is the `ShardedOptimizer` (or a layer-wise optimizer around it): its step is labelled as
    optimizer memory, including the gathered matrices of owner-rank steps."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, rank: int = 0) -> None:
        if isinstance(optimizer, LayerwiseOptimizer):  # its updates run in the inner optimizer's step
            optimizer = optimizer.optimizer
        self._tracker = _Tracker(model, optimizer)
        self._model = model
        self.device = next(model.parameters()).device
        self.rank = rank
        self._peak: dict[str, int] | None = None
        self._state_peak: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._process_peak: int | None = None

    @contextmanager
    def region(self) -> Iterator[RankMeter]:
        process.reset_peak(self.device)
        self._tracker.reset_mod_stats()
        with self._tracker:
            # FSDPMemTracker refuses a second forward of the root in one tracked region (gradient accumulation)
            # over its per-module stats; this meter reads only the global snapshots, so those are cleared before
            # each root forward (a hook prepended after the tracker's own, so it runs first)
            handle = self._model.register_forward_pre_hook(lambda *_: self._tracker.reset_mod_stats(), prepend=True)
            try:
                yield self
            finally:
                handle.remove()
        peak = _categories(_device(self._tracker.get_tracker_snapshot("peak")))
        if self._peak is None or sum(peak.values()) > sum(self._peak.values()):
            self._peak = peak
        self._state_peak = self._tracker.state_peak
        self._held = _categories(_device(self._tracker.get_tracker_snapshot("current")))
        proc = process.peak(self.device)
        if proc is not None:
            self._process_peak = max(self._process_peak or 0, proc)

    def report(self, **notes: Any) -> RankReport:
        if self._peak is None:
            raise RuntimeError("RankMeter.report() called before any region() was measured")
        return RankReport(self.rank, self._peak, self._state_peak, self._held, self._process_peak, notes)


def _device(snapshot: dict) -> dict:
    return next(iter(snapshot.values()), {})
