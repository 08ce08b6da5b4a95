"""The default train step: forward, backward (with gradient accumulation), clip, optimizer step."""

from __future__ import annotations

import torch
from torch import nn

from memfit.memory.precision import Precision
from memfit.memory.precision import precision as policy_of
from memfit.techniques.base import Batch, Context, ForwardBackward, LossFn, StepTechnique, TrainStep


def model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss (HF models shift causal-LM labels and ignore -100)."""
    return model(**batch).loss


def autocast_for(device: torch.device, precision: str | Precision):
    """Autocast to the compute dtype under a -mixed precision (`memory/precision.py`), else nothing."""
    return policy_of(precision).autocast_context(device)


def make_grad_scaler(precision: str | Precision, device: torch.device):
    """`torch.amp.GradScaler` (dynamic loss scaling: start 2^16, halve on inf/NaN and skip the step, double after
    2000 clean steps) when the precision scales the loss (16-mixed), else None."""
    return torch.amp.GradScaler(device.type) if policy_of(precision).loss_scaling else None


def make_forward_backward(loss_fn: LossFn, device: torch.device, precision: str | Precision,
                          scaler=None) -> ForwardBackward:
    """Forward under the precision's autocast, backward of `loss * loss_scale` (times the scaler's scale)."""
    policy = policy_of(precision)

    def forward_backward(model: nn.Module, batch: Batch, loss_scale: float) -> torch.Tensor:
        with policy.autocast_context(device):
            loss = loss_fn(model, batch)
        scaled = loss * loss_scale
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
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
            scaler = ctx.grad_scaler
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients; inf/NaN recorded for step()
            if ctx.grad_clip is not None and not getattr(optimizer, "clips_in_backward", False):
                params = [p for p in ctx.model.parameters() if p.grad is not None]
                if params:
                    torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip, foreach=False)
            if scaler is not None:
                scaler.step(optimizer)  # skipped when a gradient overflowed
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return total / len(batches)

        return train_step
