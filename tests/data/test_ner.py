from memfit.data import ConllData, build_data
from memfit.data.ner import align_labels

TRAIN = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
Kalashnikov NNP B-NP B-PER
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_align_labels():
    assert align_labels([None, 0, 1, 1, 1, 2, None], [5, 3, 8]) == [-100, 5, 3, -100, -100, 8, -100]


def test_tiny_file_alignment(tmp_path, minilm_tokenizer):
    path = tmp_path / "train.txt"
    path.write_text(TRAIN)
    bundle = build_data(ConllData(train=str(path), eval=str(path), tag_column=3), minilm_tokenizer)
    assert bundle.label_names == ["B-ORG", "B-PER", "I-PER", "O"]
    assert bundle.num_labels == 4 and len(bundle.train) == 2 and len(bundle.eval) == 2
    first = bundle.train[0]
    # [CLS] eu rejects kala ##sh ##nikov . [SEP]
    assert minilm_tokenizer.convert_ids_to_tokens(first["input_ids"]) == [
        "[CLS]",
        "eu",
        "rejects",
        "kala",
        "##sh",
        "##nikov",
        ".",
        "[SEP]",
    ]
    assert first["labels"].tolist() == [-100, 0, 3, 1, -100, -100, 3, -100]
    assert bundle.train[1]["labels"].tolist() == [-100, 1, 2, -100]
    batch = bundle.collate([bundle.train[0], bundle.train[1]])
    assert batch["labels"][1].tolist() == [-100, 1, 2, -100, -100, -100, -100, -100]


def test_truncation_keeps_alignment(tmp_path, minilm_tokenizer):
    path = tmp_path / "long.txt"
    path.write_text("".join(f"Kalashnikov{i} X X {'B-PER' if i % 2 else 'O'}\n" for i in range(40)))
    bundle = build_data(ConllData(train=str(path), tag_column=3, max_length=12), minilm_tokenizer)
    item = bundle.train[0]
    assert len(item["input_ids"]) == 12 and item["labels"][-1] == -100
    kept = [x for x in item["labels"].tolist() if x != -100]
    assert bundle.label_names == ["B-PER", "O"] and len(kept) >= 2
    assert [bundle.label_names[x] for x in kept] == ["B-PER" if i % 2 else "O" for i in range(len(kept))]


def test_real_conll_subset(minilm_tokenizer, shared_data):
    cfg = ConllData(
        train=str(shared_data / "conll2003" / "train.txt"),
        eval=str(shared_data / "conll2003" / "valid.txt"),
        max_train_examples=200,
        max_eval_examples=100,
    )
    bundle = build_data(cfg, minilm_tokenizer, seed=0)
    assert bundle.label_names == sorted(["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"])
    assert len(bundle.train) == 200 and len(bundle.eval) == 100
    # first valid sentence: "CRICKET - LEICESTERSHIRE TAKE OVER AT TOP AFTER INNINGS VICTORY ."
    labels = [x for x in bundle.eval[0]["labels"].tolist() if x != -100]
    names = [bundle.label_names[x] for x in labels]
    assert names == ["O", "O", "B-ORG", "O", "O", "O", "O", "O", "O", "O", "O"]
