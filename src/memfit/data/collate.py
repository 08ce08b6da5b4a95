"""Padding collator: stacks a list of items (dicts of LongTensors) into a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label value the loss ignores (padding, special tokens, non-first sub-tokens)


@dataclass
class PadCollator:
    """Right-pads 1-D fields to the longest item (input_ids with `pad_id`, attention_mask and token_type_ids
    with 0, labels with -100) and stacks 0-D fields (sequence labels).

    An `attention_mask` is added when the items have none but their lengths differ.
    `pad_to_multiple_of` rounds the padded length up (tensor-core friendly shapes on GPU).
    """

    pad_id: int = 0
    pad_to_multiple_of: int | None = None

    def pad_value(self, key: str) -> int:
        if key == "input_ids":
            return self.pad_id
        if key == "labels":
            return IGNORE_INDEX
        return 0

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(it["input_ids"]) for it in items]
        longest = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = -(-longest // m) * m
        needs_mask = "attention_mask" not in items[0] and (min(lengths) != longest)
        batch: dict[str, torch.Tensor] = {}
        for key in items[0]:
            values = [torch.as_tensor(it[key]) for it in items]
            if values[0].dim() == 0:
                batch[key] = torch.stack(values)
                continue
            out = torch.full((len(values), longest), self.pad_value(key), dtype=values[0].dtype)
            for row, v in enumerate(values):
                out[row, : len(v)] = v
            batch[key] = out
        if needs_mask:
            mask = torch.zeros(len(items), longest, dtype=torch.long)
            for row, n in enumerate(lengths):
                mask[row, :n] = 1
            batch["attention_mask"] = mask
        return batch
