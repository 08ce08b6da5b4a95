"""Activation checkpointing — Chen, Xu, Zhang & Guestrin 2016, "Training Deep Nets with Sublinear Memory Cost";
selective variant after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models".

A checkpointed module keeps only its inputs during forward and recomputes its internals during backward
(`torch.utils.checkpoint`, non-reentrant, so it nests with saved-tensor hooks and works with frozen inputs).
Full: every decoder layer. Selective: every k-th layer (`every`), and/or only chosen module types inside the
layers (`modules: [LlamaMLP]`) — the MLP holds ~half a Llama layer's saved bytes for a fraction of its FLOPs.

    activations: [{name: checkpointing, every: 2}]
    activations: [{name: checkpointing, modules: [LlamaMLP, LlamaAttention]}]
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from memfit.activations import _common as c
from memfit.activations import layout as lay
from memfit.compat import count_training_calls, fail, find_instance
from memfit.errors import ConfigError
from memfit.memory import estimate as est
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Batch, Context, ForwardBackward, TechniqueConfig


class CheckpointingConfig(TechniqueConfig):
    every: int = Field(1, ge=1, description="checkpoint every k-th decoder layer (1 = all)")
    modules: list[str] | None = Field(None, description="module class names to checkpoint instead of whole layers")


def checkpoint_module(module: nn.Module) -> None:
    """Make `module.forward` recompute in backward (only while training with grad enabled)."""
    if getattr(module, "_memfit_checkpointed", False):
        return
    from transformers.cache_utils import Cache  # here, not at import: estimating must not load transformers

    original = module.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        cache = find_instance(args, kwargs, Cache)  # `past_key_values=` up to transformers 5.23, `cache=` after
        if not (torch.is_grad_enabled() and module.training) or (cache is not None and kwargs.get("use_cache")):
            return original(*args, **kwargs)
        module._memfit_checkpoint_calls += 1
        return checkpoint(original, *args, use_reentrant=False, **kwargs)

    module.forward = forward
    module._memfit_checkpointed = True
    module._memfit_original_forward = original
    module._memfit_checkpoint_calls = 0
    count_training_calls(module)


def uncheckpoint_module(module: nn.Module) -> None:
    if getattr(module, "_memfit_checkpointed", False):
        module.forward = module._memfit_original_forward
        del module._memfit_checkpointed, module._memfit_original_forward, module._memfit_checkpoint_calls


def select_targets(model: nn.Module, every: int = 1, modules: list[str] | None = None) -> list[nn.Module]:
    """The modules to checkpoint: every `every`-th decoder layer, or (with `modules`) the sub-modules of those
    types inside the selected layers. Raises `ConfigError` for a type the model lacks."""
    layers = list(c.decoder_layers(model))[::every]
    if not modules:
        return layers
    present = {type(m).__name__ for layer in layers for m in layer.modules()}
    missing = [name for name in modules if name not in present]
    if missing:
        raise ConfigError(f"checkpointing: module type(s) {', '.join(missing)} not found in the model's decoder "
                          f"layers; available types: {', '.join(sorted(present))}")
    wanted = set(modules)
    targets: list[nn.Module] = []
    for layer in layers:
        for m in layer.modules():
            # outermost match only: a checkpointed module already recomputes its children
            if type(m).__name__ in wanted and not any(m is not t and _contains(t, m) for t in targets):
                targets.append(m)
    return targets


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def module_saved_bytes(spec: RunSpec, kind: str, tokens: int) -> int:
    """Bytes a Llama sub-module saves beyond its own input (which a checkpoint of it still keeps)."""
    parts = est.layer_components(lay.sliced(spec, tokens, None))
    inp = tokens * spec.model.hidden * lay.act_bytes(spec)
    if "mlp" in kind.lower():
        return max(parts["mlp"] - inp, 0)
    if "attention" in kind.lower():
        return max(parts["attention"] - inp, 0)
    return 0


class Checkpointing(lay.LayoutTechnique):
    name = "checkpointing"
    plan_options = ({},)
    Config = CheckpointingConfig

    def check(self, ctx: Context) -> None:
        select_targets(ctx.model, self.config.every, self.config.modules)

    def apply(self, ctx: Context) -> None:
        inner = c.unwrap(ctx.model)
        if getattr(inner, "config", None) is not None and hasattr(inner.config, "use_cache"):
            inner.config.use_cache = False  # a cache filled during recompute would be filled twice
        self._targets = select_targets(ctx.model, self.config.every, self.config.modules)
        for module in self._targets:
            checkpoint_module(module)

    def wrap_forward_backward(self, fb: ForwardBackward, ctx: Context) -> ForwardBackward:
        def forward_backward(model: nn.Module, batch: Batch, loss_scale: float) -> torch.Tensor:
            targets = getattr(self, "_targets", [])
            for m in targets:
                m._memfit_checkpoint_calls = m._memfit_training_calls = 0
            loss = fb(model, batch, loss_scale)
            ran = sum(getattr(m, "_memfit_training_calls", 0) for m in targets)
            if ran and not any(getattr(m, "_memfit_checkpoint_calls", 0) for m in targets):
                raise fail(f"checkpointing: {ran} training calls of checkpointed modules, none through "
                           "torch.utils.checkpoint", "the model to call each decoder layer's `forward` attribute",
                           ("transformers", "torch"))
            return loss

        return forward_backward

    def shape_layout(self, spec: RunSpec, layout: lay.ActivationLayout) -> lay.ActivationLayout:
        """A checkpointed layer keeps its input (whole layers) or what its checkpointed modules do not save;
        its backward recomputes the rest, so the layer is whole again while it runs."""
        chosen = set(range(0, spec.model.n_layers, self.config.every))
        inner = sum(module_saved_bytes(spec, kind, spec.tokens) for kind in self.config.modules or [])
        if inner:
            kept = {"saved": layout.layer - inner}
        else:
            kept = {"saved": 0, "exact": lay.layer_input_bytes(spec)}
        return layout.with_layers(lambda i, plan: replace(plan, recomputed=True, **kept) if i in chosen else plan)
