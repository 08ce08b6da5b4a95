"""`memfit predict`: labels / entity spans from classification and NER models in a weight format."""

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification
from typer.testing import CliRunner

from memfit.errors import ConfigError
from memfit.predict import entities, predict

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def tokenizer():
    from memfit.models import load_model

    return load_model("minilm-l6", "seq_cls", num_labels=2).tokenizer


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(tokenizer, **kw):
    return BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, **kw)


@pytest.fixture(scope="module")
def ner_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    config = _config(tokenizer, id2label=dict(enumerate(TAGS)), label2id={t: i for i, t in enumerate(TAGS)})
    return _save(BertForTokenClassification(config).eval(), tokenizer, tmp_path_factory.mktemp("ner"))


@pytest.fixture(scope="module")
def cls_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    config = _config(tokenizer, num_labels=2, id2label={0: "negative", 1: "positive"})
    return _save(BertForSequenceClassification(config).eval(), tokenizer, tmp_path_factory.mktemp("cls"))


def test_bio_labels_to_character_spans():
    text = "Ada Lovelace visited New  York today"
    words = text.split()
    spans, pos = [], 0
    for w in words:
        start = text.index(w, pos)
        pos = start + len(w)
        spans.append((start, pos))
    got = entities(text, spans, ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-PER"])
    assert got == [{"start": 0, "end": 12, "label": "PER", "text": "Ada Lovelace"},
                   {"start": 21, "end": 30, "label": "LOC", "text": "New  York"},
                   {"start": 31, "end": 36, "label": "PER", "text": "today"}]  # I- after another type starts one


@pytest.mark.parametrize("weights", [None, "int8", "nf4"])
def test_ner_entities_are_spans_of_the_text(ner_dir, weights):
    texts = ["John Smith lives in Paris .", "Nothing here"]
    result = predict(ner_dir, texts, weights=weights)
    assert result.task == "token_cls" and len(result.records) == 2
    for rec, text in zip(result.records, texts):
        assert rec["text"] == text
        for e in rec["entities"]:
            assert text[e["start"]: e["end"]] == e["text"] and e["label"] in ("PER", "LOC")
    assert result.seconds_per_text > 0 and result.tensor_peak >= result.weight_bytes > 0


def test_classification_labels_and_formats_agree(cls_dir):
    texts = ["a wonderful film", "dull and far too long", "fine"]
    dense = predict(cls_dir, texts)
    q = predict(cls_dir, texts, weights="int8", quantize_embeddings=True)
    assert [r["label"] for r in dense.records] == [r["label"] for r in q.records]
    assert all(r["label"] in ("negative", "positive") and 0.5 <= r["score"] <= 1 for r in q.records)
    assert q.weight_bytes < 0.4 * dense.weight_bytes  # the embedding table is most of this model


def test_cli_writes_json_lines(cls_dir, tmp_path):
    from memfit.cli import app

    inputs = tmp_path / "in.txt"
    inputs.write_text("good\n\nbad\n")
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["predict", str(cls_dir), "--file", str(inputs), "--weights", "int4",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["text"] for x in lines] == ["good", "bad"]
    res = CliRunner().invoke(app, ["predict", str(cls_dir)])
    assert res.exit_code == 2 and "--text" in res.output


def test_errors(cls_dir, tmp_path):
    from memfit.models import build_llama

    build_llama("llama-tiny", 256).save_pretrained(tmp_path / "lm")
    with pytest.raises(ConfigError, match="generate"):
        predict(tmp_path / "lm", ["x"])
    with pytest.raises(ConfigError, match="nothing to predict"):
        predict(cls_dir, ["  "])
    with pytest.raises(ConfigError, match="calibrate"):
        predict(cls_dir, ["x"], weights="awq")


def test_missing_folder_says_so(tmp_path, monkeypatch):
    """A folder that does not exist is named as such (not as a malformed hub repo id), in one line."""
    from memfit.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for ref in (str(tmp_path / "missing"), "runs/missing", "./missing"):
        result = CliRunner().invoke(app, ["predict", ref, "--text", "x"])
        assert result.exit_code == 2, result.output
        assert f"{ref}: no such folder" in result.output and "Repo id" not in result.output
        assert len(result.output.strip().splitlines()) == 1
