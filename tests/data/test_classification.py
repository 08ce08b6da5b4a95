import json

import pytest
import torch

from memfit.data import ClassificationData, build_data

ROWS = [("a fine , moving film", 1), ('dull and "lifeless"', 0), ("neither good nor bad " * 30, 2), ("great", 1)]


def _write(path, rows, kind):
    if kind == "tsv":
        path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    elif kind == "csv":
        import csv

        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["sentence", "label"])
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in rows))
    return path


@pytest.mark.parametrize("kind", ["tsv", "csv", "jsonl"])
def test_small_file(tmp_path, minilm_tokenizer, kind):
    path = _write(tmp_path / f"train.{kind}", ROWS, kind)
    cfg = ClassificationData(train=str(path), eval=str(path), max_length=16)
    bundle = build_data(cfg, minilm_tokenizer)
    assert bundle.num_labels == 3 and len(bundle.train) == 4 and len(bundle.eval) == 4
    tok = minilm_tokenizer
    for i, (text, label) in enumerate(ROWS):
        item = bundle.train[i]
        assert {"input_ids", "attention_mask", "labels"} <= set(item)
        assert item["labels"].dim() == 0 and int(item["labels"]) == label
        assert item["input_ids"].tolist() == tok(text, truncation=True, max_length=16)["input_ids"]
    assert len(bundle.train[2]["input_ids"]) == 16  # truncated
    batch = bundle.collate([bundle.train[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 16) and batch["labels"].tolist() == [1, 0, 2, 1]
    assert batch["input_ids"][3, 3:].eq(tok.pad_token_id).all() and batch["attention_mask"][3].sum() == 3


def test_num_labels_given_and_subset_by_seed(tmp_path, minilm_tokenizer):
    path = _write(tmp_path / "t.tsv", [(f"text {i}", i % 2) for i in range(50)], "tsv")
    cfg = ClassificationData(train=str(path), num_labels=4, max_train_examples=10)
    a, b, c = (build_data(cfg, minilm_tokenizer, seed=s) for s in (0, 0, 1))
    assert a.num_labels == 4 and a.label_names == ["0", "1", "2", "3"] and len(a.train) == 10
    ids = lambda d: [d.train[i]["input_ids"].tolist() for i in range(10)]
    assert ids(a) == ids(b) and ids(a) != ids(c)


def test_real_sst2_dev(minilm_tokenizer, shared_data):
    dev = shared_data / "sst2" / "dev.tsv"
    cfg = ClassificationData(train=str(dev), eval=str(dev), max_length=64)
    bundle = build_data(cfg, minilm_tokenizer)
    lines = dev.read_text(encoding="utf-8").splitlines()[1:]
    assert len(bundle.train) == len(lines) == 872 and bundle.num_labels == 2
    labels = torch.stack([bundle.eval[i]["labels"] for i in range(len(bundle.eval))])
    assert labels.tolist() == [int(line.rsplit("\t", 1)[1]) for line in lines]
    first = bundle.train[0]["input_ids"]
    assert first[0] == minilm_tokenizer.cls_token_id and first[-1] == minilm_tokenizer.sep_token_id
    assert minilm_tokenizer.convert_ids_to_tokens(first[1:5]) == ["it", "'", "s", "a"]  # "it 's a charming ..."
    assert max(len(bundle.train[i]["input_ids"]) for i in range(872)) <= 64
