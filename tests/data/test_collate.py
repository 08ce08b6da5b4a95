import torch

from memfit.data.collate import IGNORE_INDEX, PadCollator


def _item(ids, labels=None, label=None, mask=True):
    item = {"input_ids": torch.tensor(ids)}
    if mask:
        item["attention_mask"] = torch.ones(len(ids), dtype=torch.long)
    if labels is not None:
        item["labels"] = torch.tensor(labels)
    if label is not None:
        item["labels"] = torch.tensor(label)
    return item


def test_pads_token_fields():
    batch = PadCollator(pad_id=7)([_item([1, 2, 3], labels=[4, -100, 5]), _item([9], labels=[6])])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [9, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[4, -100, 5], [6, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(v.dtype == torch.long for v in batch.values())


def test_stacks_sequence_labels_and_rounds_length():
    batch = PadCollator(pad_id=0, pad_to_multiple_of=4)([_item([5, 6, 7, 8, 9], label=1), _item([5, 6], label=0)])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [5, 2]


def test_adds_mask_only_when_needed():
    same = PadCollator(0)([_item([1, 2], mask=False), _item([3, 4], mask=False)])
    assert "attention_mask" not in same
    ragged = PadCollator(0)([_item([1, 2], mask=False), _item([3], mask=False)])
    assert ragged["attention_mask"].tolist() == [[1, 1], [1, 0]]
