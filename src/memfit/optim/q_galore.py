"""Q-GaLore — Zhang, Yin, Jaiswal, Liu, Zhao, Tian, Wang 2024, "Q-GaLore: Quantized GaLore with INT4 Projection
and Layer-Adaptive Low-Rank Gradients".

GaLore's low-rank Adam (8-bit moments) on weights that are *stored in INT8*:

- every projected linear weight is kept as int8 codes with one fp32 scale per group of `weight_group_size` input
  columns (symmetric, absmax / 127); forward and backward use the dequantized weight;
- the update is applied to the dequantized weight and re-quantized with **stochastic rounding**
  (round up with probability equal to the fractional part), so E[dequant(W_new)] = W − lr·ΔW: the small updates
  a deterministic int8 rounding would erase survive in expectation (the paper's point; tested);
- the projection matrices are stored in **INT4** (group-wise, `weights/int4.py`), dequantized when used;
- **layer-adaptive lazy refresh**: at each scheduled refresh the new projector is compared with the previous one
  (mean |cosine| of corresponding singular vectors); when `queue_size` successive refreshes of a layer all exceed
  `cos_threshold`, that layer's refresh interval is multiplied by `gamma` (fewer SVDs where the subspace is stable).

Each int8 layer is updated inside backward, as soon as its weight gradient exists (the gradient is a temporary,
never a stored `.grad`), as the authors' single-GPU scripts do; the other trainable parameters (embeddings,
norms, the LM head) take 8-bit AdamW at the optimizer step. Departures, stated: gradient clipping reaches only the
parameters that keep a `.grad` (the int8 layers' updates happen before the norm is known); gradient accumulation
is refused (an in-backward update cannot wait for later micro-batches).

    optimizer: {name: q_galore, rank: 128, update_proj_gap: 200, cos_threshold: 0.4, queue_size: 5, gamma: 2}
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim import quant
from memfit.optim.common import (
    DEFAULT_EXCLUDE,
    MemfitOptimizer,
    adamw_fallback_step,
    align_signs,
    basis_shape,
    check_has_trainable,
    is_target,
    moments_bytes,
    moments_direction,
    param_seed,
    project,
    project_back,
    projected_shape,
    projection_side,
    svd_basis,
)
from memfit.optim.galore import GaLore8bitConfig, GaLoreTechnique
from memfit.techniques.base import Context, OptimizerTechnique
from memfit.weights import quant as wq

PROJ_FORMAT = "int4"

# --- int8 weights with stochastic rounding -------------------------------------------------------------------


def weight_group(in_features: int, group_size: int) -> int:
    """Input columns per scale: `group_size` when it divides the row, else the whole row."""
    return group_size if in_features % group_size == 0 else in_features


def sr_quantize(w: torch.Tensor, group: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scale per group): scale = absmax / 127 per group of `group` columns, codes = ⌊w/s + u⌋
    with u ~ U[0, 1) — stochastic rounding, E[s·codes] = w (no clipping: |w/s| ≤ 127)."""
    out, inp = w.shape
    wg = w.detach().float().reshape(out, inp // group, group)
    scale = (wg.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = wg / scale.unsqueeze(-1)
    q.add_(torch.rand(wg.shape, generator=generator, device=w.device)).floor_().clamp_(-127, 127)
    return q.to(torch.int8).reshape(out, inp), scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out, inp = codes.shape
    groups = scale.shape[1]
    return (codes.float().reshape(out, groups, inp // groups) * scale.unsqueeze(-1)).reshape(out, inp)


def int8_weight_bytes(out: int, inp: int, group_size: int) -> int:
    return out * inp + 4 * out * (inp // weight_group(inp, group_size))


class _Int8LinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with W = dequant(codes, scale); backward hands ∇W to the module's update, never to `.grad`."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias, module):
        ctx.save_for_backward(x, codes, scale)
        ctx.module = module
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize_int8(codes, scale).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, gy):
        x, codes, scale = ctx.saved_tensors
        w = dequantize_int8(codes, scale)
        g = gy.reshape(-1, gy.shape[-1])
        gx = (gy @ w.to(gy.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        gb = g.sum(0).float() if ctx.has_bias and ctx.needs_input_grad[3] else None
        grad_w = g.float().t() @ x.reshape(-1, x.shape[-1]).float()
        del w
        ctx.module.update(grad_w)
        return gx, None, None, gb, None


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 codes + fp32 group scales (frozen parameters: memory measurement counts
    them as parameters); `update(grad)` is set by the optimizer."""

    def __init__(self, linear: nn.Linear, group_size: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scale = sr_quantize(linear.weight.detach(), weight_group(linear.in_features, group_size), generator)
        self.codes = nn.Parameter(codes, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = linear.bias
        self.update = self._no_optimizer

    def _no_optimizer(self, grad: torch.Tensor) -> None:
        raise ConfigError("q_galore: an int8 layer ran backward before the optimizer was built")

    def weight(self) -> torch.Tensor:
        return dequantize_int8(self.codes, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.training:
            return _Int8LinearFn.apply(x, self.codes, self.scale, self.bias, self)
        return F.linear(x, self.weight().to(x.dtype), self.bias)


def int8_targets(model: nn.Module, exclude=DEFAULT_EXCLUDE) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, attribute, linear) of every trainable linear layer the method stores in int8."""
    out = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, nn.Linear) and child.weight.requires_grad and is_target(
                    f"{name}.weight", tuple(child.weight.shape), exclude):
                out.append((name, parent, attr, child))
    return out


# --- the optimizer ---------------------------------------------------------------------------------------------


class QGaLore(MemfitOptimizer):
    """8-bit AdamW for float parameters at `step()`; Q-GaLore updates for `Int8Linear` layers inside backward."""

    def __init__(self, params, layers: list[tuple[str, Int8Linear]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 svd: str = "exact", block_size: int = quant.DEFAULT_BLOCK, min_8bit_size: int = 4096,
                 seed: int = 0, align_signs: bool = True, cos_threshold: float = 0.4, queue_size: int = 5,
                 gamma: float = 2.0, weight_group_size: int = 256, proj_group_size: int = 64) -> None:
        groups = list(params) + [{"params": [m.codes for _, m in layers], "names": [n for n, _ in layers],
                                  "int8": True}]
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd,
                        block_size=block_size, min_8bit_size=min_8bit_size, seed=seed, align_signs=align_signs,
                        cos_threshold=cos_threshold, queue_size=queue_size, gamma=gamma,
                        weight_group_size=weight_group_size, proj_group_size=proj_group_size, int8=False)
        super().__init__(groups, defaults)
        self.int8_group = self.param_groups[-1]
        self.refreshes = 0  # projector refreshes (SVDs) so far, all layers
        for index, (name, module) in enumerate(layers):
            module.update = lambda grad, m=module, n=name, i=index: self.update_int8(m, grad, n, i)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.closure_loss(closure)
        for group in self.param_groups:
            if group["int8"]:
                continue  # updated inside backward
            for p in group["params"]:
                if p.grad is not None:
                    adamw_fallback_step(p, p.grad, group, self.state[p], p.numel() >= group["min_8bit_size"],
                                        group["block_size"])
        return loss

    # --- one int8 layer, inside backward ----------------------------------------------------------------------
    @torch.no_grad()
    def update_int8(self, module: Int8Linear, grad: torch.Tensor, name: str, index: int) -> None:
        group = self.int8_group
        state = self.state[module.codes]
        step = state.get("step", 0)
        seed = param_seed(group["seed"], name, index)
        side = projection_side(tuple(grad.shape), group["proj_type"])
        basis = self._basis(grad, group, state, side, seed, step)
        low = project(grad, basis, side)
        state["step"] = step + 1
        direction = moments_direction(state, low, group, step + 1, True, group["block_size"])
        update = project_back(direction, basis, side).mul_(group["scale"])
        w = module.weight()
        w.add_(update, alpha=-group["lr"])
        del update, direction
        if group["weight_decay"] > 0:
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])
        gen = torch.Generator(device=w.device).manual_seed(param_seed(seed, None, step))
        codes, scale = sr_quantize(w, weight_group(module.in_features, group["weight_group_size"]), gen)
        module.codes.copy_(codes)
        module.scale.copy_(scale)

    def _basis(self, grad: torch.Tensor, group: dict, state: dict, side: str, seed: int, step: int) -> torch.Tensor:
        """The int4-stored projector, refreshed every `gap` steps (the layer's own gap: lazily grown)."""
        gap = state.setdefault("gap", group["update_proj_gap"])
        if "proj_qweight" in state and step - state["refreshed_at"] < gap:
            return self._load_basis(state)
        old = self._load_basis(state) if "proj_qweight" in state else None
        new = svd_basis(grad, group["rank"], side, group["svd"], seed=seed + step)
        if group["align_signs"]:
            new = align_signs(new, old, side)
        if old is not None:
            self._adapt_gap(state, group, projector_similarity(new, old, side))
        shape = tuple(new.shape)
        stored = wq.quantize_tensor(new, PROJ_FORMAT, wq.effective_group(PROJ_FORMAT, shape[1],
                                                                          group["proj_group_size"]))
        for key, value in stored.items():
            state[f"proj_{key}"] = value
        state["proj_shape"] = list(shape)
        state["refreshed_at"] = step
        self.refreshes += 1
        return self._load_basis(state)

    @staticmethod
    def _load_basis(state: dict) -> torch.Tensor:
        stored = {k[len("proj_"):]: v for k, v in state.items() if k.startswith("proj_") and k != "proj_shape"}
        return wq.dequantize_tensor(PROJ_FORMAT, stored, tuple(state["proj_shape"]))

    @staticmethod
    def _adapt_gap(state: dict, group: dict, similarity: float) -> None:
        queue = state.setdefault("similar", [])
        queue.append(similarity >= group["cos_threshold"])
        del queue[:-group["queue_size"]]
        if len(queue) == group["queue_size"] and all(queue):
            state["gap"] = int(math.ceil(state["gap"] * group["gamma"]))
            queue.clear()


def projector_similarity(new: torch.Tensor, old: torch.Tensor, side: str) -> float:
    """Mean |cosine| between corresponding singular vectors of two projectors (1 = the same subspace basis)."""
    dim = 1 if side == "right" else 0
    return float(F.cosine_similarity(new.float(), old.float(), dim=dim).abs().mean())


# --- the technique ---------------------------------------------------------------------------------------------


class QGaLoreConfig(GaLore8bitConfig):
    cos_threshold: float = Field(0.4, ge=0, le=1, description="projector similarity that counts as stable")
    queue_size: int = Field(5, ge=1, description="successive stable refreshes before a layer's gap grows")
    gamma: float = Field(2.0, ge=1, description="factor a stable layer's refresh interval grows by")
    weight_group_size: int = Field(256, gt=0, description="input columns per int8 weight scale")
    proj_group_size: int = Field(64, gt=0, description="columns per int4 projector scale")


class QGaLoreTechnique(OptimizerTechnique):
    """`optimizer: {name: q_galore, rank: 128, ...}`: int8 weights (stochastic rounding), int4 projectors."""

    name = "q_galore"
    Config = QGaLoreConfig
    full_weights_only = True  # stores and projects whole weight matrices: never over an adapter
    conflicts = ("weights", "wta_crs")

    @classmethod
    def plan_variants(cls, spec: RunSpec, pretrained: bool = False) -> list[dict[str, Any]]:
        """GaLore's planned rank and fine-tuning scale; never layer-wise (its int8 layers already update in
        backward) nor with accumulated micro-batches."""
        if spec.grad_accum > 1:
            return []
        return [{**v, "name": cls.name} for v in GaLoreTechnique.plan_variants(spec, pretrained)
                if not v.get("layerwise")]

    def check(self, ctx: Context) -> None:
        if self.config.layerwise:
            raise ConfigError("q_galore already updates its int8 layers inside backward; remove layerwise: true")
        if ctx.spec.grad_accum > 1:
            raise ConfigError("q_galore updates each int8 layer inside backward, so it cannot accumulate gradients "
                              "over micro-batches; set train.grad_accum: 1 (raise the batch size instead)")
        for t in ctx.techniques or []:
            if t.slot in ("weights", "adapter") or t.name in self.conflicts:
                raise ConfigError(f"q_galore stores and trains the linear weights in int8 itself; it cannot be "
                                  f"combined with {t.slot} '{t.name}' — remove one of them")
        for _, _, _, lin in int8_targets(ctx.model):
            self._check_rank(lin)

    def _check_rank(self, lin: nn.Linear) -> None:
        if self.config.rank > min(lin.weight.shape):
            raise ConfigError(f"q_galore rank {self.config.rank} exceeds min{tuple(lin.weight.shape)} of a linear "
                              f"layer; use rank <= {min(lin.weight.shape)}")

    def apply(self, ctx: Context) -> None:
        gen = torch.Generator().manual_seed(param_seed(self.config.seed, None, 8))
        self._layers = []
        for name, parent, attr, lin in int8_targets(ctx.model):
            module = Int8Linear(lin, self.config.weight_group_size, gen)
            setattr(parent, attr, module)
            self._layers.append((name, module))
        if not self._layers:
            raise ConfigError("q_galore found no trainable linear layer to store in int8 (embeddings and heads "
                              "stay in float)")

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        check_has_trainable(ctx.model)
        c = self.config
        floats = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad]
        decay = [(n, p) for n, p in floats if p.ndim >= 2]
        no_decay = [(n, p) for n, p in floats if p.ndim < 2]
        groups = [{"params": [p for _, p in items], "names": [n for n, _ in items], "weight_decay": wd}
                  for items, wd in ((decay, c.weight_decay), (no_decay, 0.0)) if items]
        return QGaLore(groups, getattr(self, "_layers", []), lr=c.lr, betas=c.betas, eps=c.eps,
                       weight_decay=c.weight_decay, rank=c.rank, update_proj_gap=c.update_proj_gap, scale=c.scale,
                       proj_type=c.proj_type, svd=c.svd, block_size=c.block_size, min_8bit_size=c.min_8bit_size,
                       seed=c.seed, align_signs=c.align_signs, cos_threshold=c.cos_threshold,
                       queue_size=c.queue_size, gamma=c.gamma, weight_group_size=c.weight_group_size,
                       proj_group_size=c.proj_group_size)

    # --- its memory story ----------------------------------------------------------------------------------------
    def _int8(self, p: ParamInfo) -> bool:
        return p.trainable and is_target(p.name, p.shape) and p.name.endswith(".weight")

    def param_state_bytes(self, p: ParamInfo) -> int:
        c = self.config
        if not self._int8(p):
            return moments_bytes(p.numel, p.bytes_per_element, p.numel >= c.min_8bit_size, c.block_size)
        side = projection_side(p.shape, c.proj_type)
        b = basis_shape(p.shape, c.rank, side)
        low = projected_shape(p.shape, c.rank, side)
        proj = wq.get_format(PROJ_FORMAT).storage_bytes(b[0], b[1], wq.effective_group(PROJ_FORMAT, b[1],
                                                                                       c.proj_group_size))
        return proj + 2 * quant.quantized_bytes(low[0] * low[1], c.block_size)

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """Parameters: int8 codes + scales for the projected layers; gradients: only the float parameters' (an int8
        layer's ∇W is a backward temporary with its dequantized weight); optimizer: int4 projectors + 8-bit
        low-rank moments, 8-bit AdamW for the rest."""
        c = self.config
        params = grads = state = 0
        widest = 0
        for p in spec.model.params:
            if self._int8(p):
                params += int8_weight_bytes(p.shape[0], p.shape[1], c.weight_group_size)
                widest = max(widest, p.numel)
            else:
                params += p.nbytes
                grads += p.nbytes if p.trainable else 0
            if p.trainable:
                state += self.param_state_bytes(p)
        # inside backward, on top of backprop's transients: ∇W, the updated weight, the rounding noise and the
        # scaled codes of the widest layer (fp32)
        temporaries = base.temporaries + 4 * 4 * widest
        return base.with_(parameters=params, gradients=grads, optimizer=state, temporaries=temporaries)
