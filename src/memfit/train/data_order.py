"""Deterministic batch order: micro-batch `i` is a pure function of (seed, i), so resume needs no iterator state."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset


class BatchStream:
    """Endless shuffled micro-batches; epoch `e` uses the permutation seeded by (seed, e)."""

    def __init__(self, dataset: Dataset, batch_size: int, collate: Callable[[list], dict], seed: int = 0,
                 drop_last: bool = True) -> None:
        self.dataset = dataset
        self.batch_size = min(batch_size, len(dataset))
        self.collate = collate
        self.seed = seed
        n = len(dataset)
        self.batches_per_epoch = n // self.batch_size if drop_last else -(-n // self.batch_size)
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.dataset), generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def shuffled(self, i: int) -> dict:
        """The i-th training micro-batch (shuffled, epochs repeat)."""
        epoch, pos = divmod(i, self.batches_per_epoch)
        perm = self._permutation(epoch)
        idx = perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        return self.collate([self.dataset[j] for j in idx])

    def ordered(self, i: int) -> dict:
        """The i-th batch in file order (evaluation)."""
        idx = range(i * self.batch_size, min(len(self.dataset), (i + 1) * self.batch_size))
        return self.collate([self.dataset[j] for j in idx])
