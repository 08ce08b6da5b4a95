"""Activation offload to host memory — after Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model
Training" / DeepSpeed's activation offloading, and torchtune's `OffloadActivations`.

Every tensor autograd saves during forward (above `min_bytes`, parameters excluded) is copied to (pinned) host
memory on a side CUDA stream — overlapping the copy with compute — and its device memory is released; backward
copies it back when autograd unpacks it. Built on `torch.autograd.graph.saved_tensors_hooks`, so it composes
with checkpointing (a checkpointed layer saves only its input, which is offloaded) and chunked CE.
On a CPU device the tensors already live in host memory: the hooks pass them through unchanged.

    activations: [{name: offload, min_bytes: 1048576}]
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from pydantic import Field
from torch import nn

from memfit.activations import _common as c
from memfit.activations import layout as lay
from memfit.compat import fail
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Batch, Context, ForwardBackward, TechniqueConfig


class OffloadConfig(TechniqueConfig):
    min_bytes: int = Field(1 << 20, ge=0, description="tensors smaller than this stay on the device")
    pin_memory: bool = True


class OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that park accelerator tensors in host memory until backward needs them."""

    def __init__(self, params: set[int], min_bytes: int = 1 << 20, pin_memory: bool = True) -> None:
        self.params, self.min_bytes, self.pin_memory = params, min_bytes, pin_memory
        self.offloaded_bytes = 0
        self.packed = 0  # tensors autograd handed to `pack` (on CPU they pass through unchanged)
        self._streams: dict[torch.device, Any] = {}
        super().__init__(self.pack, self.unpack)

    def pack(self, t: torch.Tensor) -> Any:
        self.packed += 1
        nbytes = t.numel() * t.element_size()
        if (t.device.type == "cpu" or nbytes < self.min_bytes or c.is_weight(t, self.params)
                or not t.is_non_overlapping_and_dense()):
            return t
        pin = self.pin_memory and t.device.type == "cuda"
        host = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cpu", pin_memory=pin)
        event = None
        if t.device.type == "cuda" and pin:
            stream = self._streams.get(t.device)
            if stream is None:
                stream = self._streams[t.device] = torch.cuda.Stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            t.record_stream(stream)  # the device block is reused only after the copy finished
        else:
            host.copy_(t)
        self.offloaded_bytes += nbytes
        return (t.device, host, event)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, event = packed
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
        return host.to(device, non_blocking=host.is_pinned())


class Offload(lay.LayoutTechnique):
    name = "offload"
    Config = OffloadConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.last_offloaded_bytes = 0

    def wrap_forward_backward(self, fb: ForwardBackward, ctx: Context) -> ForwardBackward:
        params = c.param_storages(ctx.model)

        def forward_backward(model: nn.Module, batch: Batch, loss_scale: float) -> torch.Tensor:
            hooks = OffloadHooks(params, self.config.min_bytes, self.config.pin_memory)
            with hooks:
                loss = fb(model, batch, loss_scale)
            if model.training and hooks.packed == 0:
                raise fail("offload: autograd saved no tensor through the saved-tensor hooks in a training "
                           "forward-backward", "torch.autograd.graph.saved_tensors_hooks to see every tensor "
                           "saved for backward", ("torch",))
            self.last_offloaded_bytes = hooks.offloaded_bytes
            return loss

        return forward_backward

    def shape_layout(self, spec: RunSpec, layout: lay.ActivationLayout) -> lay.ActivationLayout:
        # the saving happens on an accelerator only; `spec.extra["device"]` names the run's device
        on_device = spec.extra.get("device", "cpu") not in ("cpu", None)
        return replace(layout, on_host=True) if on_device else layout
