import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
)

from memfit.models import build_llama


def tiny_bert(task: str = "seq_cls", num_labels: int = 3, layers: int = 2, seed: int = 0):
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    torch.manual_seed(seed)
    cls = BertForSequenceClassification if task == "seq_cls" else BertForTokenClassification
    return cls(cfg)


def tiny_llama(layers: int = 2, seed: int = 0):
    return build_llama("llama-tiny", vocab_size=64, seed=seed, num_hidden_layers=layers)


def lm_batch(batch: int = 2, seq: int = 16, vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def cls_batch(task: str, batch: int = 2, seq: int = 12, num_labels: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    shape = (batch,) if task == "seq_cls" else (batch, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, num_labels, shape, generator=g)}


