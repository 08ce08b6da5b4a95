"""Evaluation: loss and perplexity (causal LM), accuracy (sequence classification), entity F1 (NER, seqeval)."""

from __future__ import annotations

import math

import torch
from torch import nn

from memfit.progress import Ticker
from memfit.train.data_order import BatchStream


@torch.no_grad()
def evaluate(model: nn.Module, stream: BatchStream, task: str, device: torch.device, label_names: list[str],
             max_batches: int | None = None, autocast=None, progress: str | None = None) -> dict[str, float]:
    """Token-weighted loss for LMs; accuracy or seqeval F1 for classifiers. With `progress` (what to call this
    evaluation), long evaluations say how far they are (`memfit.progress`)."""
    was_training = model.training
    model.eval()
    total_loss, total_weight = 0.0, 0
    correct, count = 0, 0
    true_tags: list[list[str]] = []
    pred_tags: list[list[str]] = []
    n = stream.batches_per_epoch if max_batches is None else min(max_batches, stream.batches_per_epoch)
    ticker = Ticker(f"{progress}: batch", n) if progress else None
    for i in range(n):
        batch = {k: v.to(device) for k, v in stream.ordered(i).items()}
        with autocast() if autocast else _null():
            out = model(**batch)
        labels = batch["labels"]
        if task == "causal_lm":
            weight = int((labels[:, 1:] != -100).sum())
        else:
            weight = int((labels != -100).sum())
        total_loss += float(out.loss) * weight
        total_weight += weight
        if task == "seq_cls":
            correct += int((out.logits.argmax(-1) == labels).sum())
            count += labels.numel()
        elif task == "token_cls":
            preds = out.logits.argmax(-1)
            for p_row, l_row in zip(preds.tolist(), labels.tolist()):
                keep = [(p, t) for p, t in zip(p_row, l_row) if t != -100]
                true_tags.append([label_names[t] for _, t in keep])
                pred_tags.append([label_names[p] for p, _ in keep])
        if ticker is not None:
            ticker.update(i + 1)
    model.train(was_training)
    loss = total_loss / max(1, total_weight)
    metrics = {"eval_loss": loss}
    if task == "causal_lm":
        metrics["perplexity"] = math.exp(min(loss, 50.0))
    elif task == "seq_cls":
        metrics["accuracy"] = correct / max(1, count)
    else:
        from seqeval.metrics import f1_score

        metrics["entity_f1"] = float(f1_score(true_tags, pred_tags)) if true_tags else 0.0
    return metrics


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
