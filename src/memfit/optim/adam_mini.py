"""Adam-mini (Zhang, Chen, Li, Ding, Chen, Sun, Luo, Kingma 2024, "Adam-mini: Use Fewer Learning Rates To Gain
More").

Adam's second moment is replaced by one value per parameter *block* — the mean of the squared gradient over the
block — following the Hessian's near-block-diagonal structure of Transformers: one block per attention head for
queries and keys, one per output neuron (row) for values, attention output, MLP, embeddings and the output layer,
one per tensor for norms; biases keep full Adam. The first moment stays full. State drops from 2 to ~1 value per
parameter. Partition and update order follow the authors' package `adam-mini` (v1.1.1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from pydantic import Field

from memfit.errors import ConfigError
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim.base import OptimizerConfig
from memfit.optim.common import MemfitOptimizer, MemfitOptimizerTechnique, group_names

QK_KEYS = ("q_proj", "k_proj", "wq", "wk", "query", "key")
ROW_KEYS = ("embed", "embd", "wte", "lm_head", "output", "final_layer", "v_proj", "wv", "value", "o_proj", "wo",
            "attn.proj", "mlp", "feed_forward", "linear")


def block_kind(name: str) -> str:
    """'adam' (full second moment), 'head' (per attention head), 'row' (per output neuron) or 'tensor'."""
    name = name.lower()
    if "bias" in name:
        return "adam"
    if any(k in name for k in QK_KEYS):
        return "head"
    if any(k in name for k in ROW_KEYS):
        return "row"
    return "tensor"


def second_moment_numel(name: str, shape: tuple[int, ...], head_numel: int) -> int:
    kind = block_kind(name)
    numel = math.prod(shape)
    if kind == "adam":
        return numel
    if kind == "head":
        return numel // head_numel
    if kind == "row":
        return shape[0]
    return 1


class AdamMini(MemfitOptimizer):
    """Adam-mini over named parameters: groups must carry `names` (as `memfit.optim.common.split_groups` makes).

    `hidden_size` and `num_heads` give the per-head block of queries/keys: hidden_size**2 / num_heads values.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, hidden_size: int = 2048, num_heads: int = 32) -> None:
        if hidden_size <= 0 or num_heads <= 0 or (hidden_size * hidden_size) % num_heads:
            raise ConfigError(f"Adam-mini needs hidden_size**2 divisible by num_heads, got {hidden_size}, {num_heads}")
        self.head_numel = hidden_size * hidden_size // num_heads
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            names = group_names(group)
            if any(n is None for n in names):
                raise ConfigError("Adam-mini partitions parameters by name: pass groups with a 'names' list "
                                  "(e.g. memfit.optim.common.split_groups(model, weight_decay))")
            for p, name in zip(group["params"], names):
                if block_kind(name) == "head" and p.numel() % self.head_numel:
                    raise ConfigError(f"Adam-mini: '{name}' {tuple(p.shape)} does not split into heads of "
                                      f"{self.head_numel} values; check hidden_size / num_heads")

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p, name in zip(group["params"], group_names(group)):
                if p.grad is None:
                    continue
                grad, state, kind = p.grad, self.state[p], block_kind(name)
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = p.new_zeros(self._v_shape(kind, p))
                state["step"] += 1
                step = state["step"]
                if wd > 0:
                    p.mul_(1 - lr * wd)
                state["exp_avg"].lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"]
                v.mul_(beta2).add_(self._block_mean_sq(kind, grad), alpha=1 - beta2)
                h = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                update = self._blocks(kind, state["exp_avg"]) / (h * (1 - beta1**step))
                p.add_(update.view(p.shape), alpha=-lr)
        return loss

    def _v_shape(self, kind: str, p: torch.Tensor) -> tuple[int, ...]:
        if kind == "adam":
            return tuple(p.shape)
        if kind == "head":
            return (p.numel() // self.head_numel, 1)
        if kind == "row":
            return (p.shape[0], 1)
        return ()

    def _blocks(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        if kind == "head":
            return t.view(-1, self.head_numel)
        if kind == "row":
            return t.view(t.shape[0], -1)
        return t

    def _block_mean_sq(self, kind: str, grad: torch.Tensor) -> torch.Tensor:
        if kind == "adam":
            return grad * grad
        if kind == "tensor":
            return (grad * grad).sum() / grad.numel()
        return (self._blocks(kind, grad) ** 2).mean(dim=1, keepdim=True)


class AdamMiniConfig(OptimizerConfig):
    hidden_size: int | None = Field(None, gt=0)  # default: the model config's
    num_heads: int | None = Field(None, gt=0)


class AdamMiniTechnique(MemfitOptimizerTechnique):
    """`optimizer: {name: adam_mini}` (hidden size and heads read from the model config unless given)."""

    name = "adam_mini"
    plan_options = ({},)
    Config = AdamMiniConfig
    exclude = ()

    def _shape(self, hidden: int, heads: int) -> tuple[int, int]:
        return self.config.hidden_size or hidden, self.config.num_heads or heads

    def build_optimizer(self, ctx):
        config = getattr(ctx.model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        self._dims = self._shape(hidden or 0, heads or 0)
        if not all(self._dims):
            raise ConfigError("adam_mini: set hidden_size and num_heads (the model has no transformers config)")
        return super().build_optimizer(ctx)

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        c = self.config
        hidden, heads = self._dims
        return AdamMini(groups, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay,
                        hidden_size=hidden, num_heads=heads)

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        hidden, heads = self._shape(spec.model.hidden, spec.model.n_heads)
        v = second_moment_numel(p.name, p.shape, hidden * hidden // heads)
        return int((p.numel + v) * p.bytes_per_element)
