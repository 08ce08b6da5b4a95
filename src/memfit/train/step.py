"""The default train step: forward, backward (with gradient accumulation), clip, optimizer step."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from memfit.techniques.base import Batch, Context, ForwardBackward, LossFn, StepTechnique, TrainStep


def model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss (HF models shift causal-LM labels and ignore -100)."""
    return model(**batch).loss


def autocast_for(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def make_forward_backward(loss_fn: LossFn, device: torch.device, precision: str) -> ForwardBackward:
    def forward_backward(model: nn.Module, batch: Batch, loss_scale: float) -> torch.Tensor:
        with autocast_for(device, precision):
            loss = loss_fn(model, batch)
        (loss * loss_scale).backward()
        return loss.detach()

    return forward_backward


def set_accumulating(optimizer, accumulating: bool) -> None:
    """Tell an in-backward (layer-wise) optimizer whether this backward is a non-final micro-batch."""
    hook = getattr(optimizer, "set_accumulating", None)
    if hook is not None:
        hook(accumulating)


class BackpropStep(StepTechnique):
    """Plain backpropagation: accumulate gradients over micro-batches, clip, step, free gradients."""

    name = "backprop"
    plan_options = ({},)
    needs_gradients = True

    def make_train_step(self, ctx: Context, forward_backward: ForwardBackward) -> TrainStep:
        def train_step(batches: list[Batch]) -> float:
            optimizer = ctx.optimizer
            total = 0.0
            for i, batch in enumerate(batches):
                set_accumulating(optimizer, i < len(batches) - 1)
                total += float(forward_backward(ctx.model, batch, 1.0 / len(batches)))
            if ctx.grad_clip is not None and not getattr(optimizer, "clips_in_backward", False):
                params = [p for p in ctx.model.parameters() if p.grad is not None]
                if params:
                    torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip, foreach=False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return total / len(batches)

        return train_step
