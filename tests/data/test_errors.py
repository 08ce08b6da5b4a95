"""Every user-caused data problem raises DataError with a message that says what is wrong and what to change."""

import json

import pytest

from memfit.data import ClassificationData, ConllData, TextData, build_data
from memfit.errors import DataError, MemfitError


def _tsv(path, header, rows):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return str(path)


def test_is_a_memfit_error():
    assert issubclass(DataError, MemfitError)


@pytest.mark.parametrize("kind", ["text", "classification", "conll"])
def test_missing_file_names_path(tmp_path, cache, minilm_tokenizer, kind):
    missing = tmp_path / "nope" / "train.txt"
    cfg = {
        "text": TextData(paths=[str(missing)]),
        "classification": ClassificationData(train=str(missing)),
        "conll": ConllData(train=str(missing)),
    }[kind]
    with pytest.raises(DataError, match="not found") as err:
        build_data(cfg, None if kind == "text" else minilm_tokenizer, cache_dir=cache)
    assert str(missing) in str(err.value)


def test_missing_eval_file_names_path(tmp_path, minilm_tokenizer):
    train = _tsv(tmp_path / "t.tsv", "sentence\tlabel", ["a\t0", "b\t1"])
    with pytest.raises(DataError, match="dev.tsv"):
        build_data(ClassificationData(train=train, eval=str(tmp_path / "dev.tsv")), minilm_tokenizer)


def test_empty_text_file(tmp_path, small_corpus, cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty") as err:
        build_data(TextData(paths=[str(empty)], vocab_size=300), cache_dir=cache)
    assert "empty.txt" in str(err.value)
    # also when a non-empty file trained the tokenizer
    with pytest.raises(DataError, match="empty.txt.*empty"):
        build_data(TextData(paths=[str(small_corpus), str(empty)], vocab_size=300), cache_dir=cache)


def test_jsonl_without_text_field(tmp_path, cache):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"no field 'text'.*content.*text_field"):
        build_data(TextData(paths=[str(path)], vocab_size=300), cache_dir=cache)


@pytest.mark.parametrize("content", ["", "sentence\tlabel\n", "sentence\tlabel\n\n\n"])
def test_empty_classification_file(tmp_path, minilm_tokenizer, content):
    path = tmp_path / "t.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match="no examples") as err:
        build_data(ClassificationData(train=str(path)), minilm_tokenizer)
    assert str(path) in str(err.value)


def test_empty_conll_file(tmp_path, minilm_tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\n")
    with pytest.raises(DataError, match="no sentences"):
        build_data(ConllData(train=str(path)), minilm_tokenizer)


@pytest.mark.parametrize("ext", ["tsv", "jsonl"])
def test_wrong_column_names(tmp_path, minilm_tokenizer, ext):
    path = tmp_path / f"t.{ext}"
    if ext == "tsv":
        _tsv(path, "text\ty", ["good\t1", "bad\t0"])
    else:
        path.write_text(json.dumps({"text": "good", "y": 1}) + "\n")
    with pytest.raises(DataError) as err:
        build_data(ClassificationData(train=str(path)), minilm_tokenizer)
    msg = str(err.value)
    for name in ("'text'", "'y'", "sentence", "label", "text_column", "label_column"):
        assert name in msg, (name, msg)


def test_label_out_of_range_in_train(tmp_path, minilm_tokenizer):
    train = _tsv(tmp_path / "t.tsv", "sentence\tlabel", ["a\t0", "b\t1", "c\t5"])
    with pytest.raises(DataError) as err:
        build_data(ClassificationData(train=train, num_labels=2), minilm_tokenizer)
    msg = str(err.value)
    assert "label 5" in msg and "line 4" in msg and "num_labels=2" in msg


def test_negative_label(tmp_path, minilm_tokenizer):
    train = _tsv(tmp_path / "t.tsv", "sentence\tlabel", ["a\t0", "b\t-1", "c\t1"])
    with pytest.raises(DataError, match=r"line 3: label -1 is out of range for num_labels=2"):
        build_data(ClassificationData(train=train), minilm_tokenizer)


def test_label_out_of_range_in_eval(tmp_path, minilm_tokenizer):
    train = _tsv(tmp_path / "t.tsv", "sentence\tlabel", ["a\t0", "b\t1"])
    dev = _tsv(tmp_path / "d.tsv", "sentence\tlabel", ["a\t0", "b\t2"])
    with pytest.raises(DataError, match=r"d\.tsv line 3: label 2 is out of range for num_labels=2"):
        build_data(ClassificationData(train=train, eval=dev), minilm_tokenizer)


@pytest.mark.parametrize("bad", ["positive", "1.5", ""])
def test_non_integer_label(tmp_path, minilm_tokenizer, bad):
    train = _tsv(tmp_path / "t.tsv", "sentence\tlabel", ["a\t0", f"b\t{bad}"])
    with pytest.raises(DataError, match=rf"line 3: label '{bad}'.*not an integer"):
        build_data(ClassificationData(train=train), minilm_tokenizer)


def test_single_class_needs_num_labels(tmp_path, minilm_tokenizer):
    train = _tsv(tmp_path / "t.tsv", "sentence\tlabel", ["a\t0", "b\t0"])
    with pytest.raises(DataError, match="num_labels"):
        build_data(ClassificationData(train=train), minilm_tokenizer)


def test_ragged_row(tmp_path, minilm_tokenizer):
    train = _tsv(tmp_path / "t.tsv", "sentence\tlabel", ["a\t0", "b\t1\textra"])
    with pytest.raises(DataError, match="line 3 has 3 fields"):
        build_data(ClassificationData(train=train), minilm_tokenizer)


def test_block_size_larger_than_corpus(tmp_path, small_corpus, cache):
    with pytest.raises(DataError, match=r"block_size 100000 is larger than the training split .*lower data.block_size"):
        build_data(TextData(paths=[str(small_corpus)], block_size=100_000, vocab_size=300), cache_dir=cache)
    # fits the training part but not the held-out tail
    with pytest.raises(DataError, match=r"validation split .*val_fraction"):
        build_data(
            TextData(paths=[str(small_corpus)], block_size=2000, val_fraction=0.01, vocab_size=300), cache_dir=cache
        )


def test_unknown_tag_in_eval(tmp_path, minilm_tokenizer):
    train = tmp_path / "train.txt"
    train.write_text("Paris B-LOC 0\nis O 0\n")
    dev = tmp_path / "dev.txt"
    dev.write_text("Peter B-PER 0\n\nParis B-LOC 0\nrocks B-FOO 0\n")
    with pytest.raises(DataError) as err:
        build_data(ConllData(train=str(train), eval=str(dev)), minilm_tokenizer)
    msg = str(err.value)
    assert "'B-PER'" in msg and "line 1" in msg and "['B-LOC', 'O']" in msg


def test_conll_missing_tag_column(tmp_path, minilm_tokenizer):
    train = tmp_path / "train.txt"
    train.write_text("Paris B-LOC\nis\n")
    with pytest.raises(DataError, match=r"line 2 has 1 column.*tag_column"):
        build_data(ConllData(train=str(train)), minilm_tokenizer)


def test_pretrained_kinds_need_tokenizer(tmp_path):
    train = _tsv(tmp_path / "t.tsv", "sentence\tlabel", ["a\t0", "b\t1"])
    with pytest.raises(DataError, match="tokenizer"):
        build_data(ClassificationData(train=train))


def test_unknown_extension(tmp_path, minilm_tokenizer):
    path = tmp_path / "t.parquet"
    path.write_text("x")
    with pytest.raises(DataError, match=r"\.tsv, \.csv or \.jsonl"):
        build_data(ClassificationData(train=str(path)), minilm_tokenizer)
