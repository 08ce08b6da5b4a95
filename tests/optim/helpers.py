"""Shared fixtures of the optimizer tests: a tiny Llama, fixed batches, a train loop, state measurement."""

from __future__ import annotations

import torch

from memfit.memory.measure import MemoryMeter
from memfit.models import build_llama

VOCAB = 256


def tiny(seed: int = 0) -> torch.nn.Module:
    return build_llama("llama-tiny", VOCAB, seed=seed)


def batches(n: int, seed: int = 0, batch: int = 2, seq: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def train(model: torch.nn.Module, opt, data: list[torch.Tensor], accum: int = 1) -> list[float]:
    """One optimizer step per `accum` consecutive batches; returns the losses."""
    losses = []
    for i in range(0, len(data), accum):
        for ids in data[i:i + accum]:
            loss = loss_of(model, ids)
            (loss / accum).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def measured_state(model: torch.nn.Module, opt, steps: int = 2) -> int:
    """Optimizer bytes MemTracker attributes after `steps` measured train steps."""
    meter = MemoryMeter(model, opt)
    for ids in batches(steps, seed=1):
        with meter.region():
            loss_of(model, ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return meter.current().optimizer
