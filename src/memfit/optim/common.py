"""Shared math of the optimizer package: Adam moments, low-rank projectors, the AdamW fallback for parameters a
method does not handle, hyper-parameter checks, and the technique base every optimizer technique here extends.

Conventions (chosen to match the reference packages galore-torch / apollo-torch, so parity can be tested):
- Adam direction is the "HF AdamW" form: `m / (sqrt(v) + eps) * sqrt(1 - b2^t) / (1 - b1^t)`, and decoupled weight
  decay is applied after the update (`p -= lr * wd * p`).
- A projector is a plain tensor `P` kept in the optimizer state: "right" side keeps `P` of shape (r, n) and projects
  `G @ P.T` (m, r); "left" side keeps `P` of shape (m, r) and projects `P.T @ G` (r, n). `"std"` picks right when
  m >= n, so the projected state is always on the smaller dimension.
- The step counter is a Python int in the state (no tensor), so optimizer state bytes are exactly the moments,
  projectors and quantization scales.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.arch import is_router
from memfit.memory.estimate import gradient_bytes
from memfit.memory.spec import ParamInfo, RunSpec
from memfit.optim import quant
from memfit.optim.base import check_has_trainable, is_no_decay
from memfit.techniques.base import Context, OptimizerTechnique

PROJ_TYPES = ("std", "reverse_std", "left", "right")
SVD_METHODS = ("exact", "randomized")
DEFAULT_EXCLUDE = ("embed", "lm_head", "classifier", "score", "pooler", "wte", "wpe")
"""2-D parameters whose names contain one of these are not projected (they train with AdamW), as in the papers."""


# --- hyper-parameter checks ----------------------------------------------------------------------------------
def check_positive_int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"optimizer '{key}' must be a positive integer, got {value!r}")
    return value


def check_choice(value: str, choices: Iterable[str], key: str) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"optimizer '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_rank(rank: Any, shape: tuple[int, ...], name: str) -> int:
    """A rank must be in 1..min(m, n) of the matrix it projects."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"optimizer 'rank' must be a positive integer, got {rank!r}")
    limit = min(shape)
    if rank > limit:
        raise ConfigError(
            f"optimizer 'rank' {rank} is larger than min(m, n) = {limit} of parameter '{name}' {tuple(shape)}; "
            f"use rank <= {limit} or exclude that parameter")
    return rank


# --- optimizer base -------------------------------------------------------------------------------------------
class MemfitOptimizer(torch.optim.Optimizer):
    """`torch.optim.Optimizer` whose `load_state_dict` keeps each state tensor's saved dtype (the base class casts
    every state tensor of a floating parameter to the parameter's dtype, which would turn uint8
    codes and fp32 scales of quantized moments into something else and break exact resume)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        dtypes = {(pid, key): value.dtype for pid, st in state_dict["state"].items() for key, value in st.items()
                  if isinstance(value, torch.Tensor)}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for (pid, key), dtype in dtypes.items():
            state = self.state[params[pid]]
            if state[key].dtype != dtype:
                state[key] = state[key].to(dtype)

    @staticmethod
    def closure_loss(closure) -> Any:
        """The usual `step(closure)` contract: re-evaluate the loss with grad enabled when a closure is given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


# --- Adam math ------------------------------------------------------------------------------------------------
def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, betas: tuple[float, float],
                   eps: float, step: int) -> torch.Tensor:
    """Update the moments in place and return the bias-corrected Adam direction (HF form)."""
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    correction = math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    return (exp_avg / exp_avg_sq.sqrt().add_(eps)).mul_(correction)


def apply_update(p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
    """`p -= lr * update`, then decoupled weight decay on the updated weights (galore-torch/apollo-torch order)."""
    p.add_(update, alpha=-group["lr"])
    if group.get("weight_decay", 0.0) > 0.0:
        p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def moments_direction(state: dict, grad: torch.Tensor, group: dict, step: int, quantized: bool = False,
                      block_size: int = quant.DEFAULT_BLOCK) -> torch.Tensor:
    """Adam direction for `grad` with moments kept in `state`: full precision (`exp_avg`, `exp_avg_sq`, shaped like
    `grad`) or block-wise 8-bit (`exp_avg_q`/`exp_avg_absmax`, `exp_avg_sq_q`/`exp_avg_sq_absmax`)."""
    if not quantized:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        return adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, group["betas"], group["eps"], step)
    _init_quantized_moments(state, grad, block_size)
    return _quantized_direction(state, grad, group, step, block_size)


def _init_quantized_moments(state: dict, like: torch.Tensor, block_size: int) -> None:
    if "exp_avg_q" not in state:
        quant.init_moment(state, "exp_avg", like, block_size)
        quant.init_moment(state, "exp_avg_sq", like, block_size)


def _quantized_direction(state: dict, grad: torch.Tensor, group: dict, step: int, block_size: int,
                         span: tuple[int, int] | None = None) -> torch.Tensor:
    """Adam direction with 8-bit moments: dequantize, update, requantize — the whole moments, or the flat values
    `span` (of `quant.chunked_spans`) for a `grad` slice of that range."""
    exp_avg = quant.load_moment(state, "exp_avg", block_size, span=span)
    exp_avg_sq = quant.load_moment(state, "exp_avg_sq", block_size, span=span)
    direction = adam_direction(exp_avg, exp_avg_sq, grad.float(), group["betas"], group["eps"], step)
    quant.store_moment(state, "exp_avg", exp_avg, block_size, span=span)
    quant.store_moment(state, "exp_avg_sq", exp_avg_sq, block_size, span=span)
    return direction.to(grad.dtype)


def moments_bytes(numel: int, bytes_per_element: float, quantized: bool = False,
                  block_size: int = quant.DEFAULT_BLOCK) -> int:
    """State bytes of the two Adam moments of `numel` values (see `moments_direction`)."""
    if quantized:
        return 2 * quant.quantized_bytes(numel, block_size)
    return int(2 * numel * bytes_per_element)


def adamw_fallback_step(p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict, quantized: bool = False,
                        block_size: int = quant.DEFAULT_BLOCK) -> None:
    """Full AdamW for the parameters a method leaves alone (norms, biases, embeddings, heads)."""
    state["step"] = state.get("step", 0) + 1
    if quantized and p.is_contiguous():
        _quantized_adamw_step(p, grad, group, state, block_size)
    else:
        apply_update(p, moments_direction(state, grad, group, state["step"], quantized, block_size), group)


def _quantized_adamw_step(p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict, block_size: int) -> None:
    """AdamW with 8-bit moments, one range of whole blocks at a time: dequantize, update, requantize and apply per
    chunk, so the fp32 temporaries are a chunk's and never the parameter's (Dettmers et al. do the same per
    block inside one fused kernel). Elementwise, so the result equals the whole-tensor step."""
    _init_quantized_moments(state, grad, block_size)
    flat_p, flat_g = p.view(-1), grad.reshape(-1)
    for start, end in quant.chunked_spans(p.numel(), block_size):
        direction = _quantized_direction(state, flat_g[start:end], group, state["step"], block_size, (start, end))
        apply_update(flat_p[start:end], direction, group)


def adamw_state_bytes(p: ParamInfo) -> int:
    return moments_bytes(p.numel, p.bytes_per_element)


# --- projections ----------------------------------------------------------------------------------------------
def projection_side(shape: tuple[int, ...], proj_type: str) -> str:
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def basis_shape(shape: tuple[int, ...], rank: int, side: str) -> tuple[int, int]:
    m, n = shape
    return (rank, n) if side == "right" else (m, rank)


def projected_shape(shape: tuple[int, ...], rank: int, side: str) -> tuple[int, int]:
    m, n = shape
    return (m, rank) if side == "right" else (rank, n)


def project(g: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return g @ basis.t() if side == "right" else basis.t() @ g


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return low @ basis if side == "right" else basis @ low


def svd_basis(g: torch.Tensor, rank: int, side: str, method: str = "exact", seed: int = 0,
              oversample: int = 8, niter: int = 2) -> torch.Tensor:
    """Top-`rank` singular vectors of `g` on `side`: exact `torch.linalg.svd` or randomized `torch.svd_lowrank`."""
    matrix = g.float()
    if method == "exact":
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        basis = vh[:rank] if side == "right" else u[:, :rank]
    else:
        q = min(rank + oversample, *matrix.shape)
        devices = [matrix.device] if matrix.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, _, v = torch.svd_lowrank(matrix, q=q, niter=niter)
        basis = v[:, :rank].t() if side == "right" else u[:, :rank]
    return basis.to(g.dtype).contiguous()


def align_signs(new: torch.Tensor, old: torch.Tensor | None, side: str) -> torch.Tensor:
    """Flip singular vectors of `new` that point against their counterpart in `old`.

    SVD signs are arbitrary, and a flip negates that coordinate of the first moment kept from before the
    refresh; aligning with the previous basis keeps the moments meaningful when the subspace barely moves.
    """
    if old is None or old.shape != new.shape:
        return new
    dim = 1 if side == "right" else 0
    signs = torch.sign((new * old).sum(dim=dim, keepdim=True))
    return new * torch.where(signs == 0, torch.ones_like(signs), signs)


def gaussian_basis(shape: tuple[int, ...], rank: int, side: str, seed: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """A seeded random projection with entries N(0, 1/r) (APOLLO; no SVD)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    basis = torch.randn(basis_shape(shape, rank, side), generator=generator, device=device, dtype=torch.float32)
    return (basis / math.sqrt(rank)).to(dtype)


def param_seed(seed: int, name: str | None, index: int) -> int:
    """A per-parameter seed that does not depend on how parameters are grouped (so layer-wise mode agrees)."""
    key = zlib.crc32(name.encode()) if name else index
    return (seed * 1_000_003 + key) % (2**62)


class Timer:
    """Accumulates wall time spent refreshing projectors (reported by the benchmarks)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.count += 1


# --- parameter grouping ---------------------------------------------------------------------------------------
def is_target(name: str, shape: tuple[int, ...], exclude: Iterable[str] = DEFAULT_EXCLUDE) -> bool:
    """A 2-D parameter the method handles itself (others fall back to AdamW inside the same optimizer). A
    mixture-of-experts router (`is_router`) is not one: a few rows, one per expert, fewer than a usual rank."""
    return len(shape) == 2 and not any(key in name for key in exclude) and not is_router(name)


def split_groups(model: nn.Module, weight_decay: float, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[dict]:
    """Trainable params in three groups: targets (`project=True`), other decayed, non-decayed; names kept."""
    exclude = tuple(exclude)
    buckets: dict[tuple[bool, float], list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = is_target(name, tuple(p.shape), exclude)
        wd = 0.0 if is_no_decay(name, tuple(p.shape)) else weight_decay
        buckets.setdefault((target, wd), []).append((name, p))
    groups = []
    for (target, wd), items in sorted(buckets.items(), key=lambda kv: (not kv[0][0], -kv[0][1])):
        groups.append({"params": [p for _, p in items], "names": [n for n, _ in items], "weight_decay": wd,
                       "project": target})
    return groups


def group_names(group: dict) -> list[str | None]:
    names = group.get("names")
    return list(names) if names is not None else [None] * len(group["params"])


# --- technique base -------------------------------------------------------------------------------------------
class MemfitOptimizerTechnique(OptimizerTechnique):
    """Builds a memfit optimizer (optionally layer-wise) and estimates its state from the parameter shapes.

    Subclasses set `name`, `Config` and implement `make_optimizer(groups)` and `param_state_bytes(p, target)`.
    """

    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    def param_groups(self, model: nn.Module) -> list[dict]:
        return split_groups(model, self.config.weight_decay, self.exclude)

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def optimizer_factory(self) -> Callable[[list[dict]], torch.optim.Optimizer]:
        return self.make_optimizer

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        check_has_trainable(ctx.model)
        # with `layerwise: true` the run loop wraps this with `memfit.optim.layerwise.make_layerwise`
        return self.make_optimizer(self.param_groups(ctx.model))

    def param_state_bytes(self, p: ParamInfo, target: bool, spec: RunSpec) -> int:
        raise NotImplementedError

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        state = 0
        for p in spec.model.params:
            if p.trainable:
                state += self.param_state_bytes(p, is_target(p.name, p.shape, self.exclude), spec)
        changes = {"optimizer": state}
        if self.config.layerwise:
            changes["gradients"] = layerwise_gradient_bytes(spec)
        return base.with_(**changes)


def layerwise_gradient_bytes(spec: RunSpec) -> int:
    """Layer-wise updates free each gradient in its hook: one parameter's gradient at a time, unless gradients
    must persist across micro-batches (grad_accum > 1)."""
    if spec.grad_accum > 1:
        return gradient_bytes(spec)
    return max((p.nbytes for p in spec.model.trainable), default=0)


def __getattr__(name: str):
    """`state_bytes` (what the optimizer tests measure) is re-exported from `memory.measure` on first use: that
    module imports torch's MemTracker (torch.distributed, inductor: seconds), which estimating never needs."""
    if name == "state_bytes":
        from memfit.memory.measure import state_bytes

        return state_bytes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
