"""LST — Sung, Cho & Bansal 2022, "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning".

A small side network (hidden size d = hidden / `reduction`) runs beside the frozen backbone. The backbone runs
under `torch.no_grad()` and hands over its intermediate hidden states; side layer l takes
`g_l · down_l(h_l) + (1 - g_l) · s_{l-1}` (learned gate g_l = sigmoid(alpha_l / T)) through a small transformer
block. The side output, up-projected (zero-initialised, so training starts from the backbone's prediction), is
added to the backbone's last hidden state before the head. No gradient flows through the backbone, so none of
its internal activations are kept for backward — only the hidden states the side network reads.
Recipe: `adapter: {name: lst, reduction: 8}`. A classification head trains; a causal LM head stays frozen unless
`train_head: true`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.techniques.base import Context, Technique, TechniqueConfig

GATE_T = 0.1


class LSTConfig(TechniqueConfig):
    reduction: int = Field(8, ge=1, description="side hidden size = backbone hidden / reduction")
    heads: int = Field(0, ge=0, description="side attention heads (0 = one per 32 dims)")
    ffn_mult: int = Field(4, ge=1)
    train_head: bool | None = Field(None, description="default: true for classification, false for causal LM")


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


class LadderSideModel(nn.Module):
    """The frozen HF model plus its side network; `forward(**batch)` returns `.loss` and `.logits`."""

    def __init__(self, model: nn.Module, task: str, cfg: LSTConfig) -> None:
        super().__init__()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.backbone, self.task, self.config = model, task, model.config
        d, heads, ffn = side_dims(config.hidden_size, cfg)
        self.side = SideNetwork(config.num_hidden_layers, config.hidden_size, d, heads, ffn)
        self.side.to(next(model.parameters()).device)

    def _core(self) -> nn.Module:
        return self.backbone.base_model

    def head_modules(self) -> list[nn.Module]:
        if self.task == "causal_lm":
            return [self.backbone.get_output_embeddings()]
        return [getattr(self.backbone, n) for n in ("classifier", "score") if hasattr(self.backbone, n)]

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        with torch.no_grad():
            out = self._core()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
        hs = out.hidden_states
        if hs is None or len(hs) != len(self.side.downs):
            from memfit.compat import fail

            raise fail(f"adapter 'lst' received {0 if hs is None else len(hs)} hidden states from the backbone",
                       f"output_hidden_states=True to return {len(self.side.downs)} (embeddings + every layer)",
                       ("transformers",))
        final = out.last_hidden_state + self.side(hs, attention_mask, causal=self.task == "causal_lm")
        m = self.backbone
        if self.task == "causal_lm":
            logits = m.get_output_embeddings()(final)
            loss = None if labels is None else F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
        else:
            head = m.classifier if hasattr(m, "classifier") else m.score
            drop = getattr(m, "dropout", nn.Identity())
            if self.task == "seq_cls":
                pooler = getattr(self._core(), "pooler", None)
                if pooler is not None:
                    pooled = pooler(final)
                else:  # last non-padding token (decoder models)
                    last = (attention_mask.sum(1) - 1) if attention_mask is not None else \
                        torch.full((final.shape[0],), final.shape[1] - 1, device=final.device)
                    pooled = final[torch.arange(final.shape[0], device=final.device), last]
                logits = head(drop(pooled))
            else:
                logits = head(drop(final))
            loss = None if labels is None else F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class LST(Technique):
    name = "lst"
    plan_options = ({},)
    needs_pretrained = True
    plan_lr_scale = 10.0
    slot = "adapter"
    needs_gradients = True
    Config = LSTConfig

    def _train_head(self, task: str) -> bool:
        return self.config.train_head if self.config.train_head is not None else task != "causal_lm"

    def check(self, ctx: Context) -> None:
        model = ctx.model
        if not hasattr(model, "base_model") or not hasattr(model, "config"):
            raise ConfigError("adapter lst needs a transformers model (with .base_model and .config)")
        if ctx.spec.task != "causal_lm" and not any(hasattr(model, n) for n in ("classifier", "score")):
            raise ConfigError("adapter lst: this classification model has no 'classifier'/'score' head")
        side_dims(model.config.hidden_size, self.config)

    def apply(self, ctx: Context) -> None:
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        wrapped = LadderSideModel(ctx.model, ctx.spec.task, self.config)
        if self._train_head(ctx.spec.task):
            for mod in wrapped.head_modules():
                for p in mod.parameters():
                    p.requires_grad_(True)
        ctx.model = wrapped

    # --- estimating ---------------------------------------------------------------------------------
    def side_params(self, spec: RunSpec) -> list[ParamInfo]:
        m = spec.model
        d, _, ffn = side_dims(m.hidden, self.config)
        out = []
        for i in range(m.n_layers + 1):
            out += [ParamInfo(f"side.downs.{i}.weight", (d, m.hidden)), ParamInfo(f"side.downs.{i}.bias", (d,))]
        out.append(ParamInfo("side.gates", (m.n_layers,)))
        for i in range(m.n_layers):
            b = f"side.blocks.{i}."
            out += [ParamInfo(b + "self_attn.in_proj_weight", (3 * d, d)), ParamInfo(b + "self_attn.in_proj_bias", (3 * d,)),
                    ParamInfo(b + "self_attn.out_proj.weight", (d, d)), ParamInfo(b + "self_attn.out_proj.bias", (d,)),
                    ParamInfo(b + "linear1.weight", (ffn, d)), ParamInfo(b + "linear1.bias", (ffn,)),
                    ParamInfo(b + "linear2.weight", (d, ffn)), ParamInfo(b + "linear2.bias", (d,)),
                    ParamInfo(b + "norm1.weight", (d,)), ParamInfo(b + "norm1.bias", (d,)),
                    ParamInfo(b + "norm2.weight", (d,)), ParamInfo(b + "norm2.bias", (d,))]
        out += [ParamInfo("side.up.weight", (m.hidden, d)), ParamInfo("side.up.bias", (m.hidden,))]
        return out

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        train_head = self._train_head(spec.task)
        heads = ("lm_head",) if spec.task == "causal_lm" else ("classifier", "score")

        def is_head(name: str) -> bool:
            return any(h in name.split(".") for h in heads)

        params = tuple(replace(p, name="backbone." + p.name, trainable=train_head and is_head(p.name))
                       for p in spec.model.params)
        return spec.with_(model=replace(spec.model, params=params + tuple(self.side_params(spec))))

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """Activations: the hidden states the side network reads + the side blocks' own saved tensors + head."""
        m = spec.model
        d, heads, ffn = side_dims(m.hidden, self.config)
        t, b = spec.tokens, 4
        hidden_states = (m.n_layers + 1) * t * m.hidden * b
        # per side block: gate mix, 2 layer norms in/out, qkv, attention out, ffn in/act/out, residuals
        attn_probs = spec.batch * heads * spec.seq * spec.seq * b
        per_block = t * (12 * d + 3 * ffn) * b + attn_probs
        head_width = m.vocab if spec.task == "causal_lm" else m.hidden
        head = 2 * t * head_width * b
        return base.with_(activations=hidden_states + m.n_layers * per_block + head)
