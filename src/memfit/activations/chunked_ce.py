"""Chunked cross-entropy — the loss-side half of Wijmans et al. 2025, "Cut Your Losses in Large-Vocabulary
Language Models" (and torchtune's / Liger's chunked and fused linear cross-entropy): the `batch × seq × vocab`
logits, their fp32 copy and their gradient are never materialised at once.

The model body runs as usual; the LM head and the cross-entropy then run `chunk_size` tokens at a time.
Forward keeps only the final hidden states (already alive) and one fp32 log-sum-exp per token; backward
recomputes one chunk's logits at a time and turns them into that chunk's gradient (softmax − one-hot).
The gradient is exact (the same sums, in chunks); the price is one extra LM-head matmul.

    activations: [{name: chunked_ce, chunk_size: 1024}]
"""

from __future__ import annotations

import types
from dataclasses import replace

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfit.activations import _common as c
from memfit.activations import layout as lay
from memfit.memory import estimate as est
from memfit.memory.arch.flow import flow_of
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Batch, Context, LossFn, TechniqueConfig


class ChunkedCEConfig(TechniqueConfig):
    chunk_size: int = Field(1024, gt=0, description="tokens (batch × sequence, flattened) per LM-head chunk")


class _LinearCrossEntropy(torch.autograd.Function):
    """sum of CE(h @ W^T + b, t) over rows, chunk by chunk; backward recomputes one chunk's logits at a time
    from the saved log-sum-exp (N floats), so only (chunk × vocab) logits ever exist."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk):
                end = min(start + chunk, h.shape[0])
                logits = _logits(h[start:end], weight, bias)
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                t = targets[start:end]
                valid = t != c.IGNORE_INDEX
                picked = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]
                total += ((lse[start:end] - picked) * valid).sum()
                del logits
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], ctx.chunk):
                end = min(start + ctx.chunk, h.shape[0])
                h_c = h[start:end]
                t = targets[start:end]
                p = _logits(h_c, weight, bias).sub_(lse[start:end, None]).exp_()  # softmax
                valid = t != c.IGNORE_INDEX
                rows = torch.arange(end - start, device=h.device)[valid]
                p[rows, t[valid]] -= 1
                p.mul_((valid.float() * grad_total)[:, None])
                if grad_h is not None:
                    grad_h[start:end] = (p.to(h.dtype) @ weight.to(h.dtype))
                if grad_w is not None:
                    grad_w.add_(p.t() @ h_c.float())
                if grad_b is not None:
                    grad_b.add_(p.sum(0))
                del p
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype)).float()


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=c.IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `targets` (-100 ignored), `chunk_size` rows
    of the flattened (batch·seq, hidden) states at a time; equal to the unchunked loss and gradient.

    A plain `nn.Linear` head goes through a fused function (logits recomputed per chunk in backward from the
    saved log-sum-exp); any other head (adapter-wrapped, quantized) through a per-chunk checkpoint."""
    c.check_chunk(chunk_size)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    n_valid = (t != c.IGNORE_INDEX).sum().clamp_min(1)
    if type(head) is nn.Linear and head.weight.is_floating_point():
        total = _LinearCrossEntropy.apply(h, head.weight, head.bias, t, chunk_size)
        return total / n_valid
    total = hidden.new_zeros((), dtype=torch.float32)
    for h_c, t_c in zip(h.split(chunk_size), t.split(chunk_size)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h_c, t_c, head, use_reentrant=False)
        else:
            total = total + _chunk_loss(h_c, t_c, head)
    return total / n_valid


def chunked_causal_lm_loss(model: nn.Module, batch: Batch, chunk_size: int) -> torch.Tensor:
    from torch.distributed.fsdp import FSDPModule  # here, not at import: estimating must not load torch.distributed

    if isinstance(model, FSDPModule):
        return _through_root_forward(model, batch, chunk_size)
    return _causal_lm_loss(model, batch, chunk_size)


def _through_root_forward(model: nn.Module, batch: Batch, chunk_size: int) -> torch.Tensor:
    """Under FSDP2 (`memfit train --nproc N`) the root's parameters (embeddings, final norm, head) are gathered only
    around a call of the root, and the body and head here are called directly; so the loss runs as the root's
    forward for this one call (FSDP2's hooks, and a memory tracker's, then run as for any forward)."""
    had = "forward" in model.__dict__
    saved = model.__dict__.get("forward")
    model.forward = types.MethodType(lambda self, b: _causal_lm_loss(self, b, chunk_size), model)
    try:
        return model(batch)
    finally:
        if had:
            model.forward = saved
        else:
            del model.forward


def _causal_lm_loss(model: nn.Module, batch: Batch, chunk_size: int) -> torch.Tensor:
    body, head = c.causal_lm_parts(model)
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    out = body(**kwargs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return chunked_lm_loss(hidden, head, c.shifted_labels(batch), chunk_size)


class ChunkedCE(lay.LayoutTechnique):
    name = "chunked_ce"
    plan_options = ({},)
    tasks = ("causal_lm",)
    Config = ChunkedCEConfig

    def check(self, ctx: Context) -> None:
        c.check_causal_lm(ctx, self.name)
        c.causal_lm_parts(ctx.model)

    def wrap_loss(self, loss_fn: LossFn, ctx: Context) -> LossFn:
        chunk = self.config.chunk_size

        def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
            return chunked_causal_lm_loss(model, batch, chunk)

        return loss

    def shape_layout(self, spec: RunSpec, layout: lay.ActivationLayout) -> lay.ActivationLayout:
        """Forward keeps one fp32 log-sum-exp and one target per token, with one chunk's fp32 logits in flight
        (measured: CPU's log-sum-exp makes no second chunk-sized copy). Backward starts with one chunk's fp32
        probabilities, the hidden-state gradient, and — only when the head's weight trains (not under LoRA / QLoRA
        with a frozen head: autograd then asks for no weight gradient) — the fp32 head-weight gradient with the
        chunk's part (measured, tests/activations/test_chunked_ce.py)."""
        if spec.task != "causal_lm":
            return layout
        m, chunk = spec.model, min(self.config.chunk_size, spec.tokens)
        head_grad = 2 * m.vocab * m.hidden * 4 if flow_of(spec).head else 0
        backward = chunk * m.vocab * 4 + spec.tokens * m.hidden * est.dtypes(spec).compute + head_grad
        return replace(layout, head_saved=lay.norm_bytes(spec) + 12 * spec.tokens, head_transient=chunk * m.vocab * 4,
                       head_backward=backward)
