import json

import numpy as np
import torch

from memfit.data import TextData, build_data
from memfit.data import text as text_mod
from memfit.data import tokenizer as tok_mod
from memfit.data.text import encode_documents
from memfit.data.tokenizer import BOS, EOS, PAD, corpus_tokenizer

SAMPLES = [
    "Hello  world!\n\n  trailing spaces   \n",
    "ünïcödé — 😀 and tabs\tand CRLF\r\nend",
    "<tag> & 'quotes' \"double\"",
]


def test_bpe_roundtrip_and_specials(small_corpus, cache):
    tok = corpus_tokenizer([small_corpus], 300, cache_dir=cache)
    assert len(tok) == 300
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (EOS, PAD, BOS)
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}) == 3
    for s in SAMPLES + [small_corpus.read_text()[:3000]]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
    # 41 merges were learned: common text needs clearly fewer tokens than bytes
    text = small_corpus.read_text()
    assert len(tok(text)["input_ids"]) < 0.8 * len(text.encode())


def test_bpe_cached_second_call_loads(small_corpus, cache, monkeypatch):
    first = corpus_tokenizer([small_corpus], 300, cache_dir=cache)
    assert len(list(cache.glob("bpe-*"))) == 1

    def boom(*a, **k):
        raise AssertionError("tokenizer was retrained instead of loaded from the cache")

    monkeypatch.setattr(tok_mod, "train_bpe", boom)
    second = corpus_tokenizer([small_corpus], 300, cache_dir=cache)
    assert second.eos_token_id == first.eos_token_id and second.pad_token_id == first.pad_token_id
    text = small_corpus.read_text()[:5000] + SAMPLES[1]
    assert second(text)["input_ids"] == first(text)["input_ids"]
    # a different vocab size, max_chars or file content is a different cache entry
    monkeypatch.undo()
    corpus_tokenizer([small_corpus], 280, cache_dir=cache)
    corpus_tokenizer([small_corpus], 300, max_chars=5000, cache_dir=cache)
    small_corpus.write_text(small_corpus.read_text() + "\nmore")
    corpus_tokenizer([small_corpus], 300, cache_dir=cache)
    assert len(list(cache.glob("bpe-*"))) == 4


def test_cache_env_var(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "envcache"))
    corpus_tokenizer([small_corpus], 280)
    assert any((tmp_path / "envcache" / "tokenizers").glob("bpe-*/tokenizer.json"))


def test_packing_shapes_and_heldout_tail(tmp_path, small_corpus, cache):
    other = tmp_path / "other.txt"
    other.write_text("A second, shorter document.\n" * 200)
    cfg = TextData(paths=[str(small_corpus), str(other)], block_size=32, val_fraction=0.1, vocab_size=300)
    bundle = build_data(cfg, cache_dir=cache)
    tok = bundle.tokenizer
    assert len(tok) == 300 and bundle.num_labels == 0

    # expected streams, recomputed independently: each file ends with eos, its last 10 % is held out
    train_stream, val_stream = [], []
    for path in (small_corpus, other):
        ids = tok(path.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n_val = round(len(ids) * 0.1)
        train_stream += ids[: len(ids) - n_val]
        val_stream += ids[len(ids) - n_val :]
    assert len(bundle.train) == len(train_stream) // 32
    assert len(bundle.eval) == len(val_stream) // 32
    for ds, stream in ((bundle.train, train_stream), (bundle.eval, val_stream)):
        for i in (0, len(ds) - 1):
            item = ds[i]
            assert set(item) == {"input_ids", "labels"}
            assert item["input_ids"].shape == (32,) and item["input_ids"].dtype == torch.long
            assert torch.equal(item["labels"], item["input_ids"])
            assert item["input_ids"].tolist() == stream[i * 32 : (i + 1) * 32]
    # the first held-out block is text from the tail of the first file
    text = small_corpus.read_text()
    start = text.rfind(tok.decode(bundle.eval[0]["input_ids"]))
    assert start > 0.85 * len(text)
    batch = bundle.collate([bundle.train[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 32) and "attention_mask" not in batch
    assert bundle.stats["train_tokens"] == len(bundle.train) * 32


def test_token_ids_cached(small_corpus, cache, monkeypatch):
    cfg = TextData(paths=[str(small_corpus)], block_size=16, vocab_size=300)
    first = build_data(cfg, cache_dir=cache)
    assert len(list(cache.glob("ids-*.npy"))) == 1

    def boom(*a, **k):
        raise AssertionError("corpus was re-tokenized instead of read from the cache")

    monkeypatch.setattr(text_mod, "encode_documents", boom)
    second = build_data(cfg, cache_dir=cache)
    assert torch.equal(first.train.blocks, second.train.blocks)
    assert torch.equal(first.eval.blocks, second.eval.blocks)


def test_jsonl_documents_and_max_chars(tmp_path, small_corpus, cache):
    docs = [small_corpus.read_text()[i : i + 2000] for i in range(0, 10000, 2000)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    cfg = TextData(paths=[str(path)], block_size=16, vocab_size=300, text_field="body", max_chars=5000)
    bundle = build_data(cfg, cache_dir=cache)
    tok = bundle.tokenizer
    # two full documents and half of the third, each followed by eos
    expected = encode_documents([docs[0], docs[1], docs[2][:1000]], tok)
    n_val = round(len(expected) * cfg.val_fraction)
    assert (expected == tok.eos_token_id).sum() == 3
    got = torch.cat([bundle.train[i]["input_ids"] for i in range(len(bundle.train))]).numpy()
    np.testing.assert_array_equal(got, expected[: (len(expected) - n_val) // 16 * 16])


def test_pretrained_tokenizer_passed_in(small_corpus, cache, minilm_tokenizer):
    cfg = TextData(paths=[str(small_corpus)], block_size=64)
    bundle = build_data(cfg, minilm_tokenizer, cache_dir=cache)
    assert bundle.tokenizer is minilm_tokenizer
    first = bundle.train[0]["input_ids"].tolist()
    assert first == minilm_tokenizer(small_corpus.read_text()[:400], add_special_tokens=False)["input_ids"][:64]


def test_real_corpus_slice(shakespeare, cache):
    cfg = TextData(paths=[str(shakespeare)], block_size=128, vocab_size=1024, max_chars=200_000)
    bundle = build_data(cfg, cache_dir=cache)
    tokens = bundle.stats["train_tokens"] + bundle.stats["eval_tokens"]
    assert 200_000 / 5 < tokens < 200_000 / 2  # 2-5 characters per token at vocab 1024
    assert abs(bundle.stats["eval_tokens"] / tokens - 0.05) < 0.01


def test_chunks_are_lossless_without_newlines():
    from memfit.data.io import text_chunks

    text = ("word " * 30000) + "x" * 5000 + "\n" + "tail " * 10
    pieces = list(text_chunks(text, size=1000))
    assert "".join(pieces) == text and len(pieces) > 100 and max(map(len, pieces)) <= 4000


def test_long_single_line_document_roundtrip(tmp_path, small_corpus, cache):
    tok = corpus_tokenizer([small_corpus], 300, cache_dir=cache)
    doc = small_corpus.read_text().replace("\n", " ") * 3
    ids = encode_documents([doc], tok)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1].tolist()) == doc
