"""memfit optimizers are plain `torch.optim.Optimizer`s: the HF Trainer runs them unchanged."""

from __future__ import annotations

import pytest
import torch

from memfit.optim.adamw_8bit import AdamW8bit
from memfit.optim.apollo import APOLLOAdamW
from memfit.optim.common import split_groups
from memfit.optim.galore import GaLoreAdamW

from .helpers import VOCAB, tiny

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seq: int = 16) -> None:  # few sequences: loss falls as they are learnt
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("make", [
    lambda m: GaLoreAdamW(split_groups(m, 0.0), lr=1e-2, rank=8, update_proj_gap=4),
    lambda m: APOLLOAdamW(split_groups(m, 0.0), lr=1e-2, rank=8, update_proj_gap=4),
    lambda m: AdamW8bit(m.parameters(), lr=1e-2, min_8bit_size=0),
], ids=["galore", "apollo", "adamw_8bit"])
def test_trainer_runs_memfit_optimizer(make, tmp_path):
    model = tiny()
    optimizer = make(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                   optimizers=(optimizer, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert any(optimizer.state.values())  # the memfit optimizer's own state was built and used
