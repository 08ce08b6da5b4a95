import pytest
import torch

from memfit.models import build_llama

VOCAB = 256


def make_model(preset: str = "llama-tiny", seed: int = 0, vocab_size: int = VOCAB, **overrides):
    model = build_llama(preset, vocab_size, seed=seed, **overrides)
    model.train()
    return model


def make_batch(batch: int = 2, seq: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def hf_loss(model, batch):
    return model(**batch, use_cache=False).loss


def grads_of(model, loss_fn, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def tiny():
    return make_model()


def measured_activations(model, loss_fn, batch, fb=None) -> int:
    """Peak bytes of forward-produced tensors over one forward+backward (MemTracker's ACT category)."""
    from memfit.memory.measure import MemoryMeter

    meter = MemoryMeter(model)
    with meter.region():
        if fb is None:
            loss_fn(model, batch).backward()
        else:
            fb(model, batch, 1.0)
    return meter.report().category_peaks.activations
