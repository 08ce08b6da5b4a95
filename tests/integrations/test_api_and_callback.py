"""`memfit.plan(...)` from Python and `MemoryCallback` in a tiny HF Trainer run."""

from __future__ import annotations

import pytest
import torch
import transformers

import memfit


def _tiny():
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_plan_from_python_and_apply_in_a_plain_loop():
    model = _tiny()
    p = memfit.plan(model, task="finetune-causal", budget=2**40, seq=32, batch=2, device="cpu", scope="tensors",
                    precision="fp32")
    assert p.chosen.label == "adamw (fp32)" and "highest expected quality" in p.why()
    for row in p.result.rows:  # only techniques that act through the model and the optimizer
        assert not {"chunked_ce", "streambp", "mezo", "lisa"} & set(row.candidate.names)
    # a budget below full fine-tuning's tensors: an adapter or a memory-saving optimizer is chosen and applied
    tight = memfit.plan(model, task="finetune-causal", budget=p.chosen.peak - 1, seq=32, batch=2, device="cpu",
                        scope="tensors", precision="fp32")
    assert tight.chosen.peak < p.chosen.peak
    wrapped, optimizer = tight.apply(model)
    assert isinstance(optimizer, torch.optim.Optimizer)
    ids = torch.randint(0, 256, (2, 32))
    before = [t.detach().clone() for t in wrapped.parameters() if t.requires_grad]
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    after = [t for t in wrapped.parameters() if t.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_memory_callback_in_a_trainer_run(tmp_path):
    from memfit.integrations import MemoryCallback

    model = _tiny()
    ids = torch.randint(0, 256, (8, 32))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          dataloader_num_workers=0, disable_tqdm=True)
    callback = MemoryCallback(seq=32)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    rows = {r["category"]: r for r in callback.rows}
    assert {"parameters", "gradients", "optimizer", "tensor peak", "process peak"} <= rows.keys()
    assert rows["parameters"]["measured"] == rows["parameters"]["predicted"]
    assert rows["optimizer"]["measured"] == pytest.approx(rows["optimizer"]["predicted"], rel=0.05)
    assert 0.8 < rows["tensor peak"]["measured"] / rows["tensor peak"]["predicted"] < 1.2
    assert "measured" in callback.text()
    with pytest.raises(ValueError, match="seq"):
        MemoryCallback()
