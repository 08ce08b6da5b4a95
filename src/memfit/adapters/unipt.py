"""UniPT — Diao, Wan, Ma, Zhang, Lu & Rao 2024, "UniPT: Universal Parallel Tuning for Transfer Learning with
Efficient Parameter and Memory" (CVPR 2024).

A lightweight side network *parallel* to the frozen backbone, over every layer's output at once (not a ladder of
side blocks as in LST):

- **parallel interaction** — each layer's output h_l is down-projected, x_l = down_l(h_l) (width d = hidden /
  `reduction`); the backbone's final output, projected the same way, is the query q = down_q(h_N), and attends
  over layer l's tokens: a_l = softmax(q x_lᵀ / √d) x_l + x_l (causal for a causal LM, padding masked), so each
  layer contributes what the final tokens find in it, and each token keeps its own state of that layer;
- **confluence** — the layers' contributions are merged with learned softmax weights, a = Σ_l w_l a_l, passed
  through a small MLP (LayerNorm → linear → GELU) and up-projected (zero-initialised: training starts from the
  backbone's prediction) onto the final hidden state, before the backbone's head.

Departure: the `+ x_l` term is memfit's. Without it a token reads layer l only through the attention's mixture
of the sentence's tokens, which carries no token identity: on CoNLL-2003 (MiniLM, 60 steps, lr 1e-3) the side
network then learned a sentence-level push towards the majority tag — entity F1 0.014 at eval loss 0.74, below the
0.228 of the trained classifier alone on the frozen final states — and with it F1 0.327 (LoRA r8: 0.323).

The backbone runs under `torch.no_grad()` (the taps of `side.py`), so backward keeps only the layer outputs the
side network reads and its own small tensors; the memory does not grow with the backbone's MLP or attention
width. Recipe: `adapter: {name: unipt, reduction: 8}`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memfit.adapters.side import SideConfig, SideModel, SideTechnique, head_saved_bytes
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec


class UniPTConfig(SideConfig):
    pass


def side_width(hidden: int, reduction: int) -> int:
    return max(hidden // reduction, 4)


class ParallelSide(nn.Module):
    """Parallel interaction over layers 1..N, then the confluence MLP and the zero-initialised up-projection."""

    def __init__(self, n_layers: int, hidden: int, d: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, d)
        self.downs = nn.ModuleList(nn.Linear(hidden, d) for _ in range(n_layers))
        self.layer_logits = nn.Parameter(torch.zeros(n_layers))
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.up = nn.Linear(d, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, states, last: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        q = self.query(last) * (1.0 / math.sqrt(self.fc.in_features))
        seq = q.shape[1]
        bias = torch.zeros(q.shape[0], 1, seq, dtype=q.dtype, device=q.device)
        if attention_mask is not None:
            bias = bias.masked_fill(attention_mask[:, None, :] == 0, float("-inf"))
        if causal:
            bias = bias + torch.full((seq, seq), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        w = torch.softmax(self.layer_logits, 0)
        merged = None
        for layer, down in enumerate(self.downs):
            x = down(states[layer + 1])
            a = torch.softmax(q @ x.transpose(1, 2) + bias, -1) @ x + x
            merged = w[layer] * a if merged is None else merged + w[layer] * a
        return self.up(F.gelu(self.fc(self.norm(merged))))


class UniPTModel(SideModel):
    who = "unipt"

    def side_forward(self, states, last, attention_mask):
        return last + self.side(states, last, attention_mask, causal=self.task == "causal_lm")


class UniPT(SideTechnique):
    name = "unipt"
    plan_options = ({},)
    needs_pretrained = True
    plan_lr_scale = 10.0  # bench fewer-params ran it at 1e-3 against full fine-tuning's 1e-4
    Config = UniPTConfig
    model_class = UniPTModel

    def build_side(self, n_layers: int, hidden: int) -> nn.Module:
        return ParallelSide(n_layers, hidden, side_width(hidden, self.config.reduction))

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """Activations: the N layer outputs the down-projections read (the last one is also the query's input),
        per layer x_l, its attention probabilities and w_l's input a_l; the query; the confluence MLP's inputs
        (merged, LayerNorm mean/rstd, normed, fc out, GELU out); the layer weights; the head (`side.py`)."""
        m, t, b = spec.model, spec.tokens, 4
        d = side_width(m.hidden, self.config.reduction)
        per_layer = 2 * t * d * b + spec.batch * spec.seq * spec.seq * b
        side = m.n_layers * per_layer + t * d * b + (4 * t * d + 2 * t) * b + m.n_layers * b
        return base.with_(activations=self.hidden_state_bytes(spec, m.n_layers) + side
                          + head_saved_bytes(spec, self.train_head(spec.task)))
