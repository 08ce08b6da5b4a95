"""Predictions from the encoder runs (SST-2-style classification, CoNLL-style NER) in a weight format.

`predict(run, texts, weights="int8")` loads the run's exported model (a memfit run directory or a model folder),
stores its linear layers (and, with `quantize_embeddings`, its embedding tables and classifier) in the format,
and returns one record per text — `{"text", "label", "score"}` for a sequence classifier, `{"text", "entities":
[{"start", "end", "label", "text"}]}` (character spans, end exclusive) for a token classifier — with the latency
per sentence (timed without the memory tracker) and the memory by category (weights, the tensor peak, the
process peak).

Entities are read word by word (the tokenizer's `word_ids`): a word takes the label of its first sub-token (the
one trained on; the others carry -100 in training), then BIO tags are grouped into spans: B-X starts an entity, I-X
continues an entity of type X (or starts one after O or another type, as seqeval's default mode reads it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.errors import ConfigError, ModelError

TASKS = {"ForSequenceClassification": "seq_cls", "ForTokenClassification": "token_cls"}
MAX_LENGTH = 512


@dataclass
class PredictResult:
    records: list[dict[str, Any]]
    task: str
    seconds_per_text: float
    weight_bytes: int
    tensor_peak: int
    process_peak: int | None
    options: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "texts": len(self.records), "ms_per_text": 1e3 * self.seconds_per_text,
                "weight_bytes": self.weight_bytes, "tensor_peak": self.tensor_peak,
                "process_peak": self.process_peak, **self.options}


def load_encoder(ref: str | Path) -> tuple[nn.Module, Any, str]:
    """(model in eval mode, tokenizer, task) of a classification or NER run / model folder."""
    from transformers import AutoConfig

    from memfit.generate import resolve_model_dir
    from memfit.models import load_model

    source = resolve_model_dir(ref)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model of '{ref}': {str(exc).splitlines()[0]}") from None
    arch = (getattr(config, "architectures", None) or [""])[0]
    task = next((t for suffix, t in TASKS.items() if arch.endswith(suffix)), None)
    if task is None:
        raise ConfigError(f"memfit predict runs classification and NER models; '{ref}' is a {arch or 'model'} "
                          "(use memfit generate for causal LMs)")
    bundle = load_model(source, task)
    return bundle.model.eval(), bundle.tokenizer, task


def apply_format(model: nn.Module, weights: str | None, quantize_embeddings: bool = False) -> None:
    if not weights:
        if quantize_embeddings:
            raise ConfigError("--quantize-embeddings needs a weight format: add --weights int8 (or int4, nf4, ...)")
        return
    if weights == "awq":
        raise ConfigError("memfit predict does not calibrate AWQ; choose int8, int4, nf4, dfloat11 or bitstack")
    from memfit.weights import apply_weights

    apply_weights(model, weights, skip=("classifier",), embeddings=quantize_embeddings)


def label_of(model: nn.Module, index: int) -> str:
    return str(model.config.id2label.get(index, index))


@torch.no_grad()
def classify(model: nn.Module, tokenizer: Any, text: str) -> dict[str, Any]:
    enc = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    probs = model(**enc).logits[0].float().softmax(-1)
    index = int(probs.argmax())
    return {"text": text, "label": label_of(model, index), "score": round(float(probs[index]), 4)}


@torch.no_grad()
def word_labels(model: nn.Module, tokenizer: Any, words: list[str]) -> list[str]:
    """One label per word (its first sub-token's)."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    pred = model(**enc).logits[0].argmax(-1).tolist()
    labels = ["O"] * len(words)
    seen = set()
    for pos, word in enumerate(enc.word_ids()):
        if word is not None and word not in seen:
            seen.add(word)
            labels[word] = label_of(model, pred[pos])
    return labels


def entities(text: str, spans: list[tuple[int, int]], labels: list[str]) -> list[dict[str, Any]]:
    """BIO word labels → entity character spans."""
    out: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for (start, end), tag in zip(spans, labels):
        kind = tag[2:] if tag[:2] in ("B-", "I-") else None
        if kind is None:
            current = None
            continue
        if tag.startswith("I-") and current is not None and current["label"] == kind:
            current["end"] = end
        else:
            current = {"start": start, "end": end, "label": kind}
            out.append(current)
    for e in out:
        e["text"] = text[e["start"]: e["end"]]
    return out


def tag(model: nn.Module, tokenizer: Any, text: str) -> dict[str, Any]:
    words, spans, pos = [], [], 0
    for word in text.split():
        start = text.index(word, pos)
        pos = start + len(word)
        words.append(word)
        spans.append((start, pos))
    labels = word_labels(model, tokenizer, words) if words else []
    return {"text": text, "entities": entities(text, spans, labels)}


def predict(ref: str | Path, texts: list[str], weights: str | None = None,
            quantize_embeddings: bool = False) -> PredictResult:
    """Label every text with the run's model in `weights` (None: as trained); memory measured on one pass,
    latency on a second one without the tracker."""
    from memfit.memory.measure import MemoryMeter
    from memfit.weights import weight_bytes

    texts = [t for t in (t.strip() for t in texts) if t]
    if not texts:
        raise ConfigError("nothing to predict: give --text TEXT or a --file with one text per line")
    model, tokenizer, task = load_encoder(ref)
    apply_format(model, weights, quantize_embeddings)
    run = classify if task == "seq_cls" else tag
    meter = MemoryMeter(model)
    with meter.region():
        run(model, tokenizer, texts[0])
    report = meter.report()
    t0 = time.perf_counter()
    records = [run(model, tokenizer, t) for t in texts]
    seconds = (time.perf_counter() - t0) / len(texts)
    return PredictResult(records, task, seconds, weight_bytes(model), report.tensor_peak, report.process_peak,
                         {"weights": weights, "quantize_embeddings": quantize_embeddings})
