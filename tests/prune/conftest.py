"""A tiny Llama saved with a BPE tokenizer: what `memfit prune` and `memfit bench pruning` read."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from memfit.data.tokenizer import train_bpe, wrap
from memfit.models.presets import llama_config
from memfit.prune import DEFAULT_CALIB


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    text = DEFAULT_CALIB.read_text(encoding="utf-8")[:20_000]
    tokenizer = wrap(train_bpe([text], 300))
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("llama-tiny", len(tokenizer))).eval()
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
