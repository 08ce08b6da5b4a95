"""Where each decoder family keeps what structured pruning cuts: one `Layout` per family, and the index arithmetic
that turns "keep these head groups / MLP channels" into rows and columns of its (possibly fused) linears.

Every supported family is the Llama shape — `model.model.{embed_tokens, layers, norm}`, `model.lm_head`, each layer
an RMSNorm → attention → RMSNorm → gated MLP with residuals — and differs only in what a `Layout` records:
- fused projections: Phi-3's `qkv_proj` (rows: the query heads, then the key heads, then the value heads) and
  `gate_up_proj` (rows: gate channels, then up channels);
- biases, and whether the config can switch them on (Llama's `attention_bias` / `mlp_bias`, Qwen3's and Gemma's
  `attention_bias`) or they are fixed by the code (Qwen2: q/k/v always, o and the MLP never; Mistral, Phi-3: never);
- the RMSNorm scale (Gemma multiplies by 1 + w, the others by w) and an embedding scaled by √hidden (Gemma);
- per-head norms (Qwen3's `q_norm` / `k_norm`: one `head_dim` weight shared by every head, so pruning whole heads
  leaves them valid);
- whether the config insists that the hidden size is a multiple of the query heads (Llama's does; the others
  read `head_dim` from the config).
OPT and GPT-NeoX (LayerNorm, ungated MLP, head_dim = hidden / heads in their configs) have layouts too, for MLP
channels only: FLAP and LLM-Pruner cut them, SliceGPT refuses them.
The family is read from `config.model_type`, because what tells Llama and Gemma apart (the norm's 1 + w, the
embedding scale) is code, not module structure; the named modules are then checked on every layer. Anything else
is refused by name: a decoder with further norms (Gemma 2/3) or different residual wiring (Phi-1/2) would pass a
structural check and then be silently wrong after SliceGPT's rotation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from memfit.errors import ModelError

Bias = str | bool
"""A linear's bias: the name of the config flag that switches it on, or fixed on (True) / off (False) by the code."""


@dataclass(frozen=True)
class Layout:
    """How one decoder family is laid out and what its config can describe (the defaults are Llama's)."""

    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # or ("qkv_proj",): one fused linear, q, k, v rows
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")  # or ("gate_up_proj",): gate rows, then up rows
    bias: Mapping[str, Bias] = field(default_factory=dict)  # linear name -> Bias; unnamed: fixed off
    norm_offset: float = 0.0  # RMSNorm output is x̂ · (offset + w)
    norm_eps: str = "variance_epsilon"  # the norm module's epsilon attribute
    embed_scale: bool = False  # embedding output × √hidden_size
    head_norms: tuple[str, ...] = ()  # per-head norms on q / k (weight of head_dim)
    heads_divide_hidden: bool = False  # the config refuses a hidden size that is not a multiple of the heads
    o: str = "o_proj"
    down: str = "down_proj"
    layers_at: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"  # "": the MLP linears sit on the layer itself (OPT)
    gated: bool = True  # gate and up rows per channel (else one input row: OPT, GPT-NeoX)
    prune_heads: bool = True  # False: head_dim = hidden / heads in the config, so fewer heads cannot be described
    rms_norm: bool = True  # False: LayerNorm (and attention sized by hidden_size): SliceGPT refuses
    intermediate: str = "intermediate_size"  # the config key of the MLP width

    def layers(self, model: nn.Module) -> nn.ModuleList:
        for name in self.layers_at.split("."):
            model = getattr(model, name)
        return model

    def attn_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def mlp_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp) if self.mlp else layer

    def linears(self, layer: nn.Module) -> list[tuple[nn.Module, str]]:
        """(owner, name) of every linear of one decoder layer."""
        attn, mlp = self.attn_of(layer), self.mlp_of(layer)
        return [(attn, n) for n in self.attn_linears] + [(mlp, n) for n in self.mlp_linears]

    def channel_params(self, hidden: int) -> int:
        """Weights of one MLP channel: its input row(s) and its output column."""
        return (3 if self.gated else 2) * hidden

    @property
    def attn_linears(self) -> tuple[str, ...]:
        return (*self.qkv, self.o)

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        return (*self.gate_up, self.down)

    def bias_of(self, name: str) -> Bias:
        return self.bias.get(name, False)

    # --- heads ---

    def heads(self, attn: nn.Module) -> tuple[int, int, int]:
        """(query heads, key/value heads, head_dim) of one attention module, from its linears' shapes."""
        hd = getattr(attn, "head_dim", None) or attn.head_size
        n_q = getattr(attn, self.o).in_features // hd
        if len(self.qkv) == 1:
            n_kv = (getattr(attn, self.qkv[0]).out_features - n_q * hd) // (2 * hd)
        else:
            n_kv = getattr(attn, self.qkv[1]).out_features // hd
        return n_q, n_kv, hd

    def group_index(self, attn: nn.Module, groups: Iterable[int]) -> dict[str, tuple[int, torch.Tensor]]:
        """{linear name: (dim, indices)} of the head groups `groups` (a group: one key/value head and the query
        heads sharing it): q/k/v output rows (at their offsets in a fused qkv) and o_proj input columns."""
        n_q, n_kv, hd = self.heads(attn)
        rep = n_q // n_kv
        groups = list(groups)
        q = torch.cat([torch.arange(g * rep * hd, (g + 1) * rep * hd) for g in groups])
        kv = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
        if len(self.qkv) == 1:
            out = {self.qkv[0]: (0, torch.cat([q, n_q * hd + kv, (n_q + n_kv) * hd + kv]))}
        else:
            out = {self.qkv[0]: (0, q), self.qkv[1]: (0, kv), self.qkv[2]: (0, kv)}
        return out | {self.o: (1, q)}

    # --- MLP channels ---

    def channels(self, mlp: nn.Module) -> int:
        return getattr(mlp, self.down).in_features

    def channel_index(self, mlp: nn.Module, keep: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
        """{linear name: (dim, indices)} of the MLP channels `keep`: gate/up output rows (both halves of a fused
        gate_up), down_proj input columns."""
        n = self.channels(mlp)
        if len(self.gate_up) == 1 and self.gated:
            return {self.gate_up[0]: (0, torch.cat([keep, n + keep])), self.down: (1, keep)}
        return {name: (0, keep) for name in self.gate_up} | {self.down: (1, keep)}


_ATTN, _MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
LAYOUTS: dict[str, Layout] = {
    "llama": Layout(bias={n: "attention_bias" for n in _ATTN} | {n: "mlp_bias" for n in _MLP},
                    heads_divide_hidden=True),
    "mistral": Layout(),
    "qwen2": Layout(bias={"q_proj": True, "k_proj": True, "v_proj": True}),
    "qwen3": Layout(bias={n: "attention_bias" for n in _ATTN}, head_norms=("q_norm", "k_norm")),
    "gemma": Layout(bias={n: "attention_bias" for n in _ATTN}, norm_offset=1.0, norm_eps="eps", embed_scale=True),
    "phi3": Layout(qkv=("qkv_proj",), gate_up=("gate_up_proj",)),
    # LayerNorm decoders: MLP channels only (FLAP, LLM-Pruner)
    "opt": Layout(bias={n: "enable_bias" for n in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")},
                  o="out_proj", gate_up=("fc1",), down="fc2", layers_at="model.decoder.layers", mlp="", gated=False,
                  prune_heads=False, rms_norm=False, intermediate="ffn_dim"),
    "gpt_neox": Layout(bias={"query_key_value": "attention_bias", "dense": "attention_bias", "dense_h_to_4h": True,
                             "dense_4h_to_h": True},
                       qkv=("query_key_value",), o="dense", gate_up=("dense_h_to_4h",), down="dense_4h_to_h",
                       layers_at="gpt_neox.layers", attn="attention", gated=False, prune_heads=False, rms_norm=False),
}


def layout_of(model: nn.Module) -> Layout:
    """The model's `Layout`, checked against every decoder layer; `ModelError` naming the architecture otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = LAYOUTS.get(model_type)
    if layout is None:
        raise ModelError(f"structured pruning does not support architecture '{model_type}'; supported: "
                         f"{', '.join(LAYOUTS)}")
    try:
        layers = layout.layers(model)
    except AttributeError:
        raise ModelError(f"this {model_type} model has no {layout.layers_at}; pass the causal LM (…ForCausalLM)")
    for i, layer in enumerate(layers):
        for owner, names in ((layout.attn, layout.attn_linears), (layout.mlp, layout.mlp_linears)):
            sub = getattr(layer, owner, None) if owner else layer
            if sub is None or not all(type(getattr(sub, n, None)) is nn.Linear for n in names):
                raise ModelError(f"layer {i} has no plain {owner or 'layer'} linears ({', '.join(names)}); a "
                                 f"quantized or adapted model cannot be pruned: prune the dense model first")
        for n in layout.head_norms:
            norm = getattr(layout.attn_of(layer), n, None)
            if norm is None or norm.weight.numel() != layout.attn_of(layer).head_dim:
                raise ModelError(f"layer {i}'s {n} is not one head_dim norm shared by all heads; pruning heads "
                                 f"would leave it inconsistent")
    return layout
