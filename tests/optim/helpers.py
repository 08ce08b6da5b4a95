"""Shared fixtures of the optimizer tests: a tiny Llama, fixed batches, a train loop, state measurement, and the
side-by-side parity run against a reference package (galore-torch, apollo-torch)."""

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


def reference_groups(groups: list[dict], **projected) -> list[dict]:
    """memfit's parameter groups (`split_groups`) as a reference package's dicts: `projected` options on the
    groups memfit projects."""
    out = []
    for g in groups:
        d = {"params": g["params"], "weight_decay": g["weight_decay"]}
        if g["project"]:
            d.update(projected)
        out.append(d)
    return out


def shared_projection_parity(ours: type, make_ours, make_reference, projector: type, steps: int = 6) -> float:
    """Train memfit's optimizer class `ours` (built by `make_ours(cls, model)`) and a reference optimizer
    (`make_reference(model)`) side by side on two identical models for `steps` steps; returns the largest
    parameter difference. Projection matrices are random (APOLLO) or sign-ambiguous (GaLore's SVD), so the
    reference is handed memfit's, in call order, through its `projector.get_orthogonal_matrix`; everything
    else (projection side, refresh schedule, moments, scaling, decay) is its own."""
    a, b = tiny(), tiny()
    bases: list[torch.Tensor] = []

    class Recording(ours):
        def _new_basis(self, grad, group, side, seed):
            basis = super()._new_basis(grad, group, side, seed)
            bases.append(basis.clone())
            return basis

    mine, ref = make_ours(Recording, a), make_reference(b)
    original = projector.get_orthogonal_matrix
    projector.get_orthogonal_matrix = lambda self, *args, **kwargs: bases.pop(0)
    try:
        for ids in batches(steps):
            train(a, mine, [ids])
            train(b, ref, [ids])
            assert not bases, "the reference did not use every projection memfit made"
    finally:
        projector.get_orthogonal_matrix = original
    return max_param_diff(a, b)
