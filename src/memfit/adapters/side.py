"""What the side-network adapters share (LST, UniPT; SHERL uses the taps and the parameter bookkeeping).

A side network trains beside a frozen backbone and never back-propagates through it:

- **taps** — `backbone_states` runs the backbone under `torch.no_grad()` and returns the hidden states it hands
  over (embeddings + every layer), checking that the installed transformers returned them all;
- **the side network** — a subclass of `SideModel` turns those states into the final representation
  (`side_forward`), with a module built from the backbone's sizes alone (`build_side`), so the estimate reads
  its parameters off the same constructor on the meta device (`side_param_infos`);
- **the head** — `SideModel.forward` applies the backbone's own head (LM head, pooler + classifier, token
  classifier) to that representation and computes the loss.

`SideTechnique` holds the common technique part: check, freeze + wrap, the trainable head, `transform_spec`
(backbone parameters renamed under `backbone.`, side parameters added). Each method states its own side module
and activation bytes in its file.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from memfit.errors import ConfigError
from memfit.memory.estimate import trained_head_components
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.techniques.base import Context, Technique, TechniqueConfig

HEAD_MODULES = ("classifier", "score")


class SideConfig(TechniqueConfig):
    """Options every side network shares."""

    reduction: int = Field(8, ge=1, description="side hidden size = backbone hidden / reduction")
    train_head: bool | None = Field(None, description="default: true for classification, false for causal LM")


def head_names(task: str) -> tuple[str, ...]:
    return ("lm_head",) if task == "causal_lm" else HEAD_MODULES


def wants_head(train_head: bool | None, task: str) -> bool:
    """A classification head (new) trains by default; a causal LM head only when asked."""
    return train_head if train_head is not None else task != "causal_lm"


def unfreeze_head(model: nn.Module, task: str) -> None:
    for name in head_names(task):
        for p in getattr(model, name).parameters() if hasattr(model, name) else ():
            p.requires_grad_(True)


def check_tied_head(model: nn.Module, task: str, train_head: bool, who: str) -> None:
    """For methods whose backbone forward keeps a graph (SHERL, MEFT): training a causal LM head tied to the input
    embeddings would train the embeddings too, and every frozen layer above them would keep its activations."""
    if task != "causal_lm" or not train_head:
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        raise ConfigError(f"adapter {who}: this model ties its LM head to the input embeddings; training the head "
                          "would train the embeddings below the frozen layers — set train_head: false")


def is_head_param(name: str, task: str) -> bool:
    return any(h in name.split(".") for h in head_names(task))


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def backbone_states(core: nn.Module, expected: int, who: str, input_ids, attention_mask, **kwargs):
    """(hidden states: embeddings + every layer, last hidden state) of a frozen backbone, without a graph."""
    with torch.no_grad():
        out = core(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
    hs = out.hidden_states
    if hs is None or len(hs) != expected:
        from memfit.compat import fail

        raise fail(f"adapter '{who}' received {0 if hs is None else len(hs)} hidden states from the backbone",
                   f"output_hidden_states=True to return {expected} (embeddings + every layer)", ("transformers",))
    return hs, out.last_hidden_state


def head_loss(model: nn.Module, core: nn.Module, task: str, final: torch.Tensor, attention_mask, labels):
    """(logits, loss) of the backbone's own head applied to `final` (the side network's representation)."""
    if task == "causal_lm":
        logits = model.get_output_embeddings()(final)
        loss = None if labels is None else F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
        return logits, loss
    head = model.classifier if hasattr(model, "classifier") else model.score
    drop = getattr(model, "dropout", nn.Identity())
    if task == "seq_cls":
        pooler = getattr(core, "pooler", None)
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
    return logits, loss


def frozen_head_input_bytes(spec: RunSpec, train_head: bool) -> int:
    """What the family's `head` component charges for an input whose layer is frozen here: the LM head's input
    (frozen unless `train_head`), the pooler's (the whole last state, a view of it; the pooler never trains)."""
    m, t = spec.model, spec.tokens
    if spec.task == "causal_lm":
        return 0 if train_head else t * m.hidden * 4
    return t * m.hidden * 4 if spec.task == "seq_cls" and any(".pooler." in p.name for p in m.params) else 0


def backbone_head_bytes(spec: RunSpec, train_head: bool) -> int:
    """What the backbone's own head keeps when its layers below are frozen or rebuilt (SHERL, MEFT): the family's
    final norm (trainable here), head, loss and logits, without the frozen head inputs; a decoder's `embeddings`
    are the rotary tables its layers read, an encoder's (LayerNorm, dropout of frozen embeddings) are not kept."""
    head = trained_head_components(spec)
    return (head["final_norm"] + head["head"] + head["loss"] + head["logits"]
            - frozen_head_input_bytes(spec, train_head) + (head["embeddings"] if spec.task == "causal_lm" else 0))


def head_saved_bytes(spec: RunSpec, train_head: bool) -> int:
    """What `head_loss` saves for backward (fp32): the backbone family's head, minus the frozen pooler's input
    (no gradient is asked of it); a causal LM's shifted log-probabilities and targets; two scalars (the loss); and one
    int64 per token the backbone's forward leaves alive (its position / token-type ids)."""
    m, b, s, t = spec.model, spec.batch, spec.seq, spec.tokens
    if spec.task == "causal_lm":
        return (t * m.hidden * 4 if train_head else 0) + b * (s - 1) * (m.vocab * 4 + 8) + 8 + t * 8
    head = trained_head_components(spec)
    pooler_in = frozen_head_input_bytes(spec, train_head)
    labels = max(m.num_labels, 1)
    rows = b if spec.task == "seq_cls" else t
    return head["head"] - pooler_in + rows * (labels * 4 + 8) + 8 + t * 8


class SideModel(nn.Module):
    """The frozen HF model plus a side network; `forward(**batch)` returns `.loss` and `.logits`."""

    who: ClassVar[str] = "side"

    def __init__(self, model: nn.Module, task: str, side: nn.Module) -> None:
        super().__init__()
        self.backbone, self.task, self.config = model, task, model.config
        self.n_states = text_config(model).num_hidden_layers + 1
        self.side = side.to(next(model.parameters()).device)

    def _core(self) -> nn.Module:
        return self.backbone.base_model

    def head_modules(self) -> list[nn.Module]:
        if self.task == "causal_lm":
            return [self.backbone.get_output_embeddings()]
        return [getattr(self.backbone, n) for n in HEAD_MODULES if hasattr(self.backbone, n)]

    def side_forward(self, states, last: torch.Tensor, attention_mask) -> torch.Tensor:
        """The representation the head reads (default: last hidden state + the side network's output)."""
        return last + self.side(states, attention_mask, causal=self.task == "causal_lm")

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        states, last = backbone_states(self._core(), self.n_states, self.who, input_ids, attention_mask, **kwargs)
        final = self.side_forward(states, last, attention_mask)
        logits, loss = head_loss(self.backbone, self._core(), self.task, final, attention_mask, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def side_param_infos(side: nn.Module, prefix: str = "side.") -> list[ParamInfo]:
    """The parameters of a side module (built on the meta device for an estimate), as the spec names them."""
    return [ParamInfo(prefix + n, tuple(p.shape), p.element_size(), True) for n, p in side.named_parameters()]


def freeze_backbone_spec(spec: RunSpec, train_head: bool, extra: list[ParamInfo]) -> RunSpec:
    """The spec of a wrapped model: backbone parameters under `backbone.`, frozen except a trainable head."""
    params = tuple(replace(p, name="backbone." + p.name, trainable=train_head and is_head_param(p.name, spec.task))
                   for p in spec.model.params)
    return spec.with_(model=replace(spec.model, params=params + tuple(extra)))


class SideTechnique(Technique):
    """Base of the side-network adapters: the backbone is frozen and wrapped in the method's `SideModel`."""

    slot = "adapter"
    needs_gradients = True
    Config = SideConfig
    model_class: ClassVar[type[SideModel]] = SideModel

    def build_side(self, n_layers: int, hidden: int) -> nn.Module:
        """The side network for a backbone of these sizes (subclasses override)."""
        raise NotImplementedError

    def train_head(self, task: str) -> bool:
        return wants_head(self.config.train_head, task)

    def check(self, ctx: Context) -> None:
        model = ctx.model
        if not hasattr(model, "base_model") or not hasattr(model, "config"):
            raise ConfigError(f"adapter {self.name} needs a transformers model (with .base_model and .config)")
        if ctx.spec.task != "causal_lm" and not any(hasattr(model, n) for n in HEAD_MODULES):
            raise ConfigError(f"adapter {self.name}: this classification model has no 'classifier'/'score' head")
        if ctx.has_quantized_base():
            raise ConfigError(f"adapter {self.name} reads the backbone's hidden states in full precision; remove "
                              "the 'weights' technique (a side network over a quantized backbone is not built)")
        config = text_config(model)
        with torch.device("meta"):
            self.build_side(config.num_hidden_layers, config.hidden_size)  # bad sizes fail here, before apply

    def apply(self, ctx: Context) -> None:
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        config = text_config(ctx.model)
        wrapped = self.model_class(ctx.model, ctx.spec.task, self.build_side(config.num_hidden_layers,
                                                                             config.hidden_size))
        if self.train_head(ctx.spec.task):
            for mod in wrapped.head_modules():
                for p in mod.parameters():
                    p.requires_grad_(True)
        ctx.model = wrapped

    def side_params(self, spec: RunSpec) -> list[ParamInfo]:
        with torch.device("meta"):
            return side_param_infos(self.build_side(spec.model.n_layers, spec.model.hidden))

    def transform_spec(self, spec: RunSpec) -> RunSpec:
        return freeze_backbone_spec(spec, self.train_head(spec.task), self.side_params(spec))

    def head_activation_bytes(self, spec: RunSpec) -> int:
        """The head's saved tensors as LST states them: two of its widest inputs/outputs, fp32."""
        m = spec.model
        return 2 * spec.tokens * (m.vocab if spec.task == "causal_lm" else m.hidden) * 4

    def hidden_state_bytes(self, spec: RunSpec, count: int | None = None) -> int:
        m = spec.model
        return (m.n_layers + 1 if count is None else count) * spec.tokens * m.hidden * 4
