"""AWQ — Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan & Han 2024, "AWQ: Activation-aware Weight
Quantization for On-Device LLM Compression and Acceleration" (MLSys 2024).

A few input channels carry much larger activations than the rest; their weights matter most. AWQ scales those
weight columns up before group-wise quantization (so they get finer steps) and the input down by the same factor:
W·x = (W·diag(s))·(diag(s)⁻¹·x). The per-channel scale is s = mean|x|^α, with α chosen per layer by grid search
on calibration activations to minimise ‖X·Wᵀ − X·Q(W·diag(s))ᵀ·diag(s)⁻¹‖² (α = 0 is plain quantization, so the
search never does worse on the calibration set).

Differences from the paper, on purpose: s is applied to the input inside each `QuantLinear` (`in_scale`,
in_features floats per layer) instead of being folded into the preceding norm/linear, so every linear gets its
own s (no sharing constraint among q/k/v); the weight-clipping search is not done.

Recipe: `weights: {name: awq, group_size: 64, bits: 4}` — calibration comes from the run's training data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from memfit.errors import ConfigError, DataError
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.weights.base import WeightQuantConfig, WeightQuantTechnique, quantize_spec
from memfit.weights.format import WeightFormat, get_format
from memfit.weights.linear import DEFAULT_SKIP, quantizable_linears, quantize_model


def calibration_batches(data: Any, max_tokens: int = 4096, seq: int = 256) -> list[torch.Tensor]:
    """Token-id batches (1, ≤seq) from a tensor, a DataBundle / Dataset of `input_ids` dicts, or batches."""
    if data is None:
        raise ConfigError("AWQ needs calibration text: give the run training data or pass calibration token ids")
    if hasattr(data, "train") and not isinstance(data, torch.Tensor):
        data = data.train
    if isinstance(data, torch.Tensor):
        flat = data.reshape(-1).long()
        chunks = [flat[i: i + seq] for i in range(0, min(flat.numel(), max_tokens), seq)]
    else:
        chunks, total = [], 0
        items: Iterable = data if not hasattr(data, "__getitem__") or isinstance(data, (list, tuple)) else (
            data[i] for i in range(len(data)))
        for item in items:
            ids = item["input_ids"] if isinstance(item, dict) else item
            for row in torch.as_tensor(ids).reshape(-1, torch.as_tensor(ids).shape[-1]):
                chunks.append(row[:seq].long())
                total += chunks[-1].numel()
                if total >= max_tokens:
                    break
            if total >= max_tokens:
                break
    chunks = [c for c in chunks if c.numel() > 1]
    if not chunks:
        raise DataError("AWQ calibration data is empty")
    return [c.reshape(1, -1) for c in chunks]


class _Stats:
    """Per-linear mean |x| over all calibration tokens and a random sample of input rows for the loss."""

    def __init__(self, max_rows: int, gen: torch.Generator) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.n_rows = 0
        self.max_rows = max_rows
        self.gen = gen

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        room = self.max_rows - self.n_rows
        if room > 0:
            take = x[torch.randperm(x.shape[0], generator=self.gen)[:room]]
            self.rows.append(take)
            self.n_rows += take.shape[0]


@torch.no_grad()
def collect_activation_stats(model: nn.Module, names: list[str], batches: list[torch.Tensor],
                             max_rows: int = 512, seed: int = 0) -> dict[str, _Stats]:
    gen = torch.Generator().manual_seed(seed)
    stats = {n: _Stats(max_rows, gen) for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: stats[n].add(a[0]))
               for n in names]
    try:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for ids in batches:
            model(input_ids=ids.to(device))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n in names if stats[n].n_rows == 0]
    if batches and unseen:
        from memfit.compat import fail

        raise fail(f"awq: calibration saw no input of {len(unseen)} linear layers (e.g. {unseen[0]})",
                   "each linear layer's forward pre-hook to fire during the calibration forward", ("torch",))
    return stats


@torch.no_grad()
def search_scale(weight: torch.Tensor, mean_abs: torch.Tensor, x: torch.Tensor, fmt: str | WeightFormat,
                 group_size: int, n_grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale s = mean|x|^α (α on a grid in [0, 1)); returns (s, its loss, α=0 loss)."""
    fmt = get_format(fmt)
    w = weight.detach().float()
    y = x @ w.t()
    mean_abs = mean_abs.clamp_min(1e-8)
    best_s, best_err, plain_err = torch.ones_like(mean_abs), math.inf, math.inf
    for i in range(n_grid):
        alpha = i / n_grid
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        wq = fmt.decode(fmt.encode(w * s, group_size), *w.shape) / s
        err = (x @ wq.t() - y).pow(2).mean().item()
        if i == 0:
            plain_err = err
        if err < best_err:
            best_s, best_err = s, err
    return best_s, best_err, plain_err


def awq_quantize(model: nn.Module, calibration: Any, group_size: int | None = None, bits: int = 4,
                 skip: tuple[str, ...] = DEFAULT_SKIP, target: tuple[str, ...] | None = None, n_grid: int = 20,
                 max_tokens: int = 4096, seq: int = 256, max_rows: int = 512) -> nn.Module:
    """Search AWQ scales on `calibration` and quantize `model`'s linear layers to int`bits` in place."""
    fmt = get_format(f"int{bits}")
    linears = quantizable_linears(model, skip, target)
    if not linears:
        raise ConfigError("no nn.Linear layer to quantize: check 'skip' / 'target'")
    batches = calibration_batches(calibration, max_tokens, seq)
    stats = collect_activation_stats(model, [n for n, _ in linears], batches, max_rows)
    scales, report = {}, {}
    for name, lin in linears:
        st = stats[name]
        g = fmt.effective_group(lin.in_features, group_size)
        s, err, plain = search_scale(lin.weight, st.abs_sum / st.count, torch.cat(st.rows), fmt, g, n_grid)
        scales[name] = s
        report[name] = {"awq_mse": err, "plain_mse": plain}
    quantize_model(model, fmt, group_size, skip, target, in_scales=scales)
    model.awq_report = report  # per-layer calibration loss, AWQ vs plain (for benchmarks)
    return model


class AWQConfig(WeightQuantConfig):
    bits: Literal[3, 4] = 4
    n_grid: int = Field(20, ge=1, description="α grid points in [0, 1)")
    calib_tokens: int = Field(4096, gt=0)
    calib_seq: int = Field(256, gt=1)


class AWQWeights(WeightQuantTechnique):
    name = "awq"
    Config = AWQConfig

    @property
    def format(self) -> WeightFormat:  # type: ignore[override]
        return get_format(f"int{self.config.bits}")

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if ctx.data is None:
            raise ConfigError("weights 'awq' needs calibration text: the run has no training data")

    def apply(self, ctx: Context) -> None:
        c = self.config
        awq_quantize(ctx.model, ctx.data, c.group_size, c.bits, c.skip, c.target, c.n_grid, c.calib_tokens,
                     c.calib_seq)
        self.apply_embeddings(ctx)  # tables and head in the plain format: a lookup has no input channels to scale

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        c = self.config
        return quantize_spec(spec, self.format, c.group_size, c.skip, c.target, awq=True, embeddings=c.embeddings)
