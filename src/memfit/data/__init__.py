"""Data: text corpora → packed LM blocks; classification files; CoNLL token classification.

`build_data(config, tokenizer, ...)` is the one entry point the run loop uses.
"""

from memfit.data.config import ClassificationData, ConllData, DataBundle, DataConfig, TextData
from memfit.data.build import build_data

__all__ = ["ClassificationData", "ConllData", "DataBundle", "DataConfig", "TextData", "build_data"]
