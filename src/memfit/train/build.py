"""Build what a recipe describes: data, tokenizer, model, techniques applied, optimizer, train step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.data import DataBundle, build_data
from memfit.data.config import TextData
from memfit.errors import ConfigError
from memfit.memory.cache import cache_dir
from memfit.memory.precision import Precision, dtype_of_name
from memfit.memory.spec import ModelShape, RunSpec, dtype_name, model_shape
from memfit.models import build_llama, load_model, load_tokenizer
from memfit.recipe import Recipe
from memfit.techniques.base import (
    ESTIMATE_ORDER,
    Context,
    ForwardBackward,
    LossFn,
    OptimizerTechnique,
    StepTechnique,
    Technique,
    TrainStep,
)
from memfit.train.step import make_forward_backward, make_grad_scaler, model_loss


@dataclass
class BuiltRun:
    recipe: Recipe
    ctx: Context
    data: DataBundle
    techniques: list[Technique]
    train_step: TrainStep
    forward_backward: ForwardBackward
    spec: RunSpec  # the shapes before techniques transform them (estimate_run applies the transforms)
    device: torch.device
    extras: dict = field(default_factory=dict)
    par: Any = None  # memfit.train.parallel.Parallel in a distributed run

    @property
    def model(self) -> nn.Module:
        return self.ctx.model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available; use train.device=auto")
    return device


def build_model_and_data(recipe: Recipe) -> tuple[nn.Module, DataBundle]:
    """A preset Llama trains its own BPE tokenizer on the corpus; a loaded model brings its tokenizer."""
    if recipe.model.preset is not None:
        if recipe.task != "causal_lm" or not isinstance(recipe.data, TextData):
            raise ConfigError("model.preset builds a causal LM from scratch: use task: causal_lm with data.kind: text")
        data = build_data(recipe.data, None, cache_dir=cache_dir() / "tokenizers", seed=recipe.seed)
        overrides = dict(recipe.model.overrides)
        overrides.setdefault("max_position_embeddings", max(2048, recipe.data.block_size))
        model = build_llama(recipe.model.preset, vocab_size=len(data.tokenizer), seed=recipe.seed, **overrides)
        return model.to(dtype_of_name(recipe.model_dtype)), data
    if recipe.model.config is not None:
        raise ConfigError(f"model.config {recipe.model.config} describes a model without weights: it serves "
                          f"`memfit estimate` and `memfit plan`; to train, set model.path to a model folder")
    tokenizer = load_tokenizer(recipe.model.path)
    data = build_data(recipe.data, tokenizer, cache_dir=cache_dir() / "tokenizers", seed=recipe.seed)
    extra = {}
    if recipe.task == "token_cls" and data.label_names:
        extra = {"id2label": dict(enumerate(data.label_names)),
                 "label2id": {n: i for i, n in enumerate(data.label_names)}}
    num_labels = data.num_labels or None
    bundle = load_model(recipe.model.path, recipe.task, num_labels=num_labels, tokenizer=tokenizer,
                        dtype=dtype_of_name(recipe.model_dtype), **extra)
    return bundle.model, data


def seq_len_of(recipe: Recipe) -> int:
    return getattr(recipe.data, "block_size", None) or getattr(recipe.data, "max_length", 128)


@dataclass(frozen=True)
class ModelFacts:
    """What a `RunSpec` reads off a model: its `ModelShape`, attention implementation, the config's dropout
    probabilities and the storage dtype of its residual stream. Pure data: the planner caches it per model
    (`memfit.plan.meta.meta_facts`), so planning again needs neither the model nor transformers' modeling code."""

    shape: ModelShape
    attn_impl: str
    dropouts: tuple[tuple[str, float], ...]
    storage_dtype: str


def model_facts(model: nn.Module) -> ModelFacts:
    config = getattr(model, "config", None)
    dropouts = {}
    for key, name in (("attn_dropout", "attention_probs_dropout_prob"), ("attn_dropout", "attention_dropout"),
                      ("hidden_dropout", "hidden_dropout_prob")):
        if config is not None and getattr(config, name, None) is not None:
            dropouts[key] = float(getattr(config, name))
    return ModelFacts(model_shape(model), getattr(config, "_attn_implementation", None) or "sdpa",
                      tuple(dropouts.items()), storage_dtype_name(model))


def run_spec(recipe: Recipe, model: nn.Module | ModelFacts, device: torch.device | None = None) -> RunSpec:
    """The run's shapes, plus the facts the activation model needs that a `ModelShape` lacks (device, dropout)."""
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    policy = recipe.train.policy
    stored = facts.storage_dtype
    extra = {"device": (device or torch.device("cpu")).type, **dict(facts.dropouts)}
    return RunSpec(
        model=facts.shape, batch=recipe.train.batch_size, seq=seq_len_of(recipe), task=recipe.task,
        param_dtype=stored, compute_dtype=policy.compute if policy.autocast else stored, attn_impl=facts.attn_impl,
        grad_accum=recipe.train.grad_accum, extra=extra, precision=policy.name,
    )


def storage_dtype_name(model: nn.Module) -> str:
    """The dtype of the model's residual stream: its input embedding's (else its first floating parameter's)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is None or not weight.is_floating_point():
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return dtype_name(weight.dtype) if weight is not None else "fp32"


def cast_trainable(model: nn.Module, policy: Precision) -> None:
    """Store every trainable floating-point parameter in the policy's storage dtype (adapters a library made in
    another dtype; `memory.spec.cast_trainable` is the estimate's side). Frozen weights are never cast."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != policy.storage_dtype:
            p.data = p.data.to(policy.storage_dtype)


def by_slot(techniques: list[Technique], slot: str) -> list[Technique]:
    return [t for t in techniques if t.slot == slot]


def build_run(recipe: Recipe, loss_fn: LossFn = model_loss, par=None) -> BuiltRun:
    """Everything the loop needs, with every technique applied through the plug-in protocol (`loss_fn`: the
    loss the techniques wrap; the model's own by default).

    `par` (a `memfit.train.parallel.Parallel`): this rank of a distributed run — the model is sharded with FSDP2
    after the techniques are applied, and the optimizer built on the shards."""
    torch.manual_seed(recipe.seed)
    device = par.ctx.device if par is not None else resolve_device(recipe.train.device)
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    model, data = build_model_and_data(recipe)
    spec = run_spec(recipe, model, device)
    techniques = sorted(recipe.techniques(), key=lambda t: ESTIMATE_ORDER.index(t.slot))
    step_tech = by_slot(techniques, "step")[0]
    assert isinstance(step_tech, StepTechnique)
    ctx = Context(model=model, spec=spec, device=device, loss_fn=loss_fn, grad_clip=recipe.train.clip_grad_norm,
                  seed=recipe.seed, techniques=techniques, data=data)
    # techniques initialise (LoRA's A, projections) from the recipe's seed, whatever building the data drew
    # before (the first build in a process reads caches and draws differently from later ones)
    torch.manual_seed(recipe.seed)
    apply_techniques(ctx)
    cast_trainable(ctx.model, recipe.train.policy)
    ctx.model.to(device)
    ctx.model.train()
    if recipe.train.compile:
        from memfit.train.compile import compile_blocks

        if par is not None:
            raise ConfigError("train.compile: true is not built for distributed runs (FSDP2 shards the blocks "
                              "after this point); set train.compile: false")
        compile_blocks(ctx.model, recipe.train.compile_backend)
    if par is not None:
        from memfit.train import parallel

        parallel.shard(ctx, recipe, par)
    if not step_tech.owns_optimizer:
        opt_tech = by_slot(techniques, "optimizer")[0]
        assert isinstance(opt_tech, OptimizerTechnique)
        if par is not None:
            ctx.optimizer = parallel.build_optimizer(opt_tech, ctx)
        else:
            ctx.optimizer = build_optimizer(opt_tech, ctx)
    ctx.grad_scaler = make_grad_scaler(recipe.train.policy, device) if not step_tech.owns_optimizer else None
    from memfit.optim.layerwise import LayerwiseOptimizer

    if ctx.grad_scaler is not None and isinstance(ctx.optimizer, LayerwiseOptimizer):
        raise ConfigError(f"precision 16-mixed scales the loss and skips steps whose gradients overflow; optimizer "
                          f"'{by_slot(techniques, 'optimizer')[0].name}' updates inside backward, before the overflow "
                          f"is known: use precision bf16-mixed or a whole-step optimizer (layerwise: false)")
    fb = wrap_forward_backward(ctx, recipe.train.policy, loss_fn)
    train_step = step_tech.make_train_step(ctx, fb)
    if ctx.optimizer is None:
        raise ConfigError(f"step '{step_tech.name}' built no optimizer")
    return BuiltRun(recipe=recipe, ctx=ctx, data=data, techniques=techniques, train_step=train_step, forward_backward=fb, spec=spec,
                    device=device, par=par)


def apply_techniques(ctx: Context) -> None:
    """Every technique in `ctx.techniques` checks, then applies itself (they may replace `ctx.model`)."""
    for t in ctx.techniques:
        t.check(ctx)
    for t in ctx.techniques:
        t.apply(ctx)


def wrap_forward_backward(ctx: Context, precision: str | Precision = "32-true",
                          loss_fn: LossFn = model_loss) -> ForwardBackward:
    """The micro-batch forward+backward with every technique's loss and forward-backward wrappers applied;
    sets `ctx.loss_fn` to the wrapped loss."""
    for t in ctx.techniques:
        loss_fn = t.wrap_loss(loss_fn, ctx)
    ctx.loss_fn = loss_fn
    fb = make_forward_backward(loss_fn, ctx.device, precision, ctx.grad_scaler)
    for t in ctx.techniques:
        fb = t.wrap_forward_backward(fb, ctx)
    return fb


def build_optimizer(opt_tech: OptimizerTechnique, ctx: Context):
    """The optimizer slot's optimizer; with `layerwise: true` its updates run inside backward."""
    if getattr(opt_tech.config, "layerwise", False):
        from memfit.optim.layerwise import make_layerwise

        return make_layerwise(lambda c: opt_tech.build_optimizer(c), ctx)
    return opt_tech.build_optimizer(ctx)
