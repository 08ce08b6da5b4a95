"""LST — Sung, Cho & Bansal 2022, "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning".

A small side network (hidden size d = hidden / `reduction`) runs beside the frozen backbone. The backbone runs
under `torch.no_grad()` and hands over its intermediate hidden states; side layer l takes
`g_l · down_l(h_l) + (1 - g_l) · s_{l-1}` (learned gate g_l = sigmoid(alpha_l / T)) through a small transformer
block. The side output, up-projected (zero-initialised, so training starts from the backbone's prediction), is
added to the backbone's last hidden state before the head. No gradient flows through the backbone, so none of
its internal activations are kept for backward — only the hidden states the side network reads.
Recipe: `adapter: {name: lst, reduction: 8}`. A classification head trains; a causal LM head stays frozen unless
`train_head: true`. The taps, the head and the parameter bookkeeping are shared with UniPT (`side.py`).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from memfit.adapters.side import SideConfig, SideModel, SideTechnique
from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec

GATE_T = 0.1


class LSTConfig(SideConfig):
    heads: int = Field(0, ge=0, description="side attention heads (0 = one per 32 dims)")
    ffn_mult: int = Field(4, ge=1)


def side_dims(hidden: int, cfg: LSTConfig) -> tuple[int, int, int]:
    d = max(hidden // cfg.reduction, 4)
    heads = cfg.heads or max(1, d // 32)
    if d % heads:
        raise ConfigError(f"adapter lst: side width {d} is not divisible by heads={heads}; change heads/reduction")
    return d, heads, cfg.ffn_mult * d


class SideNetwork(nn.Module):
    def __init__(self, n_layers: int, hidden: int, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.downs = nn.ModuleList(nn.Linear(hidden, d) for _ in range(n_layers + 1))
        self.gates = nn.Parameter(torch.zeros(n_layers))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(n_layers))
        self.up = nn.Linear(d, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states, attention_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        s = self.downs[0](hidden_states[0])
        seq = s.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=s.device, dtype=s.dtype) if causal else None
        pad = (attention_mask == 0) if attention_mask is not None else None
        for layer, block in enumerate(self.blocks):
            g = torch.sigmoid(self.gates[layer] / GATE_T)
            s = g * self.downs[layer + 1](hidden_states[layer + 1]) + (1 - g) * s
            s = block(s, src_mask=mask, src_key_padding_mask=pad, is_causal=causal)
        return self.up(s)


class LadderSideModel(SideModel):
    who = "lst"


class LST(SideTechnique):
    name = "lst"
    plan_options = ({},)
    needs_pretrained = True
    plan_lr_scale = 10.0
    needs_gradients = True
    Config = LSTConfig
    model_class = LadderSideModel

    def build_side(self, n_layers: int, hidden: int) -> nn.Module:
        return SideNetwork(n_layers, hidden, *side_dims(hidden, self.config))

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """Activations: the hidden states the side network reads + the side blocks' own saved tensors + head."""
        m = spec.model
        d, heads, ffn = side_dims(m.hidden, self.config)
        t, b = spec.tokens, 4
        # per side block: gate mix, 2 layer norms in/out, qkv, attention out, ffn in/act/out, residuals
        attn_probs = spec.batch * heads * spec.seq * spec.seq * b
        per_block = t * (12 * d + 3 * ffn) * b + attn_probs
        return base.with_(activations=self.hidden_state_bytes(spec) + m.n_layers * per_block
                          + self.head_activation_bytes(spec))
