"""Objectives a zeroth-order step can optimise: the loss, or a non-differentiable metric such as accuracy.

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes", §3.3) notes that SPSA needs only
objective *values*, so it can maximise accuracy or F1 directly; the closure then returns −metric.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from memfit.errors import ConfigError, DataError

Batch = dict[str, torch.Tensor]
Objective = Callable[[nn.Module, Batch], torch.Tensor]


def model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The HF model's own loss (the batch carries `labels`)."""
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise DataError("the model returned no loss: the batch needs a 'labels' entry")
    return out.loss


def _predictions_and_labels(model: nn.Module, batch: Batch, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    if "labels" not in batch:
        raise DataError("the accuracy objective needs a 'labels' entry in every batch")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if task == "causal_lm":  # next-token prediction: logits at t predict labels at t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits.argmax(dim=-1), labels


def accuracy(model: nn.Module, batch: Batch, task: str = "seq_cls") -> torch.Tensor:
    """Fraction of labelled positions (label ≠ −100) predicted correctly."""
    pred, labels = _predictions_and_labels(model, batch, task)
    mask = labels != -100
    return ((pred == labels) & mask).sum().float() / mask.sum().clamp(min=1).float()


def macro_f1(model: nn.Module, batch: Batch, task: str = "seq_cls") -> torch.Tensor:
    """Macro-averaged F1 over the classes present in labels or predictions (label ≠ −100)."""
    pred, labels = _predictions_and_labels(model, batch, task)
    mask = labels != -100
    pred, labels = pred[mask], labels[mask]
    scores = []
    for c in torch.unique(torch.cat([pred, labels])):
        tp = ((pred == c) & (labels == c)).sum().float()
        denom = (pred == c).sum().float() + (labels == c).sum().float()
        scores.append(2 * tp / denom.clamp(min=1))
    return torch.stack(scores).mean() if scores else torch.zeros(())


OBJECTIVES = ("loss", "accuracy", "f1")


def objective_fn(kind: str, task: str, loss_fn: Objective | None = None) -> Objective:
    """A (model, batch) -> value to *minimise*: the loss, −accuracy or −macro-F1."""
    if kind == "loss":
        return loss_fn or model_loss
    if kind == "accuracy":
        return lambda model, batch: -accuracy(model, batch, task)
    if kind == "f1":
        return lambda model, batch: -macro_f1(model, batch, task)
    raise ConfigError(f"unknown zeroth-order objective '{kind}'; choose one of: {', '.join(OBJECTIVES)}")
