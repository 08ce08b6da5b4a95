"""Recipe schema of the `data:` section and what building it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextData(_Strict):
    """Plain-text or JSONL (`text_field`) corpora, tokenized and packed into blocks of `block_size` tokens."""

    kind: Literal["text"] = "text"
    paths: list[str]
    block_size: int = Field(256, gt=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)  # the last fraction of each file is held out
    vocab_size: int = Field(8192, ge=259)  # BPE vocabulary trained on the corpus (from-scratch models)
    text_field: str = "text"  # for .jsonl files
    max_chars: int | None = Field(None, gt=0)  # read at most this many characters per file (quick runs)


class ClassificationData(_Strict):
    """TSV / CSV / JSONL files with a text column and an integer label column."""

    kind: Literal["classification"] = "classification"
    train: str
    eval: str | None = None
    text_column: str = "sentence"
    label_column: str = "label"
    num_labels: int | None = Field(None, ge=2)  # default: max label + 1 in the train file
    max_length: int = Field(128, gt=1)
    max_train_examples: int | None = Field(None, gt=0)
    max_eval_examples: int | None = Field(None, gt=0)


class ConllData(_Strict):
    """CoNLL-format token classification (`TOKEN ... TAG` per line, blank line between sentences)."""

    kind: Literal["conll"] = "conll"
    train: str
    eval: str | None = None
    tag_column: int = 1  # which whitespace-separated column holds the tag (CoNLL-2003 here: 1)
    max_length: int = Field(128, gt=1)
    max_train_examples: int | None = Field(None, gt=0)
    max_eval_examples: int | None = Field(None, gt=0)


DataConfig = Annotated[Union[TextData, ClassificationData, ConllData], Field(discriminator="kind")]


@dataclass
class DataBundle:
    """Datasets (items are dicts of 1-D LongTensors) plus what the model and loop need to know about them."""

    train: Dataset
    eval: Dataset | None
    collate: Callable[[list[dict]], dict]
    tokenizer: Any
    num_labels: int = 0
    label_names: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # sizes worth logging (blocks, tokens, examples)
