"""Tiny models and a one-step measurement helper shared by the memory tests."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
)

from memfit.memory.measure import MemoryMeter, MemoryReport
from memfit.memory.spec import RunSpec

TINY_BERT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=512, num_labels=3)


def tiny_llama(attn: str = "sdpa", vocab: int = 256):
    from memfit.models import build_llama

    model = build_llama("llama-tiny", vocab)
    model.set_attn_implementation(attn)
    return model.train()


def tiny_bert(task: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    cls = BertForSequenceClassification if task == "seq_cls" else BertForTokenClassification
    model = cls(BertConfig(**TINY_BERT))
    model.set_attn_implementation(attn)
    return model.train()


def batch_for(model, task: str, batch: int, seq: int, padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    if task == "causal_lm":
        return {"input_ids": ids, "labels": ids}
    n = model.config.num_labels
    labels = torch.randint(0, n, (batch,) if task == "seq_cls" else (batch, seq), generator=g)
    out = {"input_ids": ids, "labels": labels}
    if padded:  # a padded row, as a classification collator makes
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0
        out["attention_mask"] = mask
    return out


def forward_backward(model, batch, precision: str, meter: MemoryMeter) -> tuple[MemoryReport, int]:
    """One forward + backward the way the run loop does it (the loss function returns only the loss).
    Returns the report and the activation bytes alive when the forward has returned."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with meter.region():
        with ctx:
            loss = model(**batch).loss
        after_forward = meter.current().activations
        loss.backward()
        del loss
    return meter.report(), after_forward


def spec_for(model, task: str, batch: int, seq: int, precision: str, attn: str) -> RunSpec:
    return RunSpec.from_model(model, batch=batch, seq=seq, task=task, compute_dtype=precision, attn_impl=attn)


@pytest.fixture(autouse=True)
def _quiet_torch():
    torch.manual_seed(0)
    yield
