"""WTA-CRS — Liu, Wang, Zhong, Chen, Braverman, Hu et al. 2023, "Winner-Take-All Column Row Sampling for Memory
Efficient Adaptation of Language Model" (NeurIPS 2023).

A linear layer y = x Wᵀ + b needs its input x only for the weight gradient ∇W = Σᵢ gᵢᵀ xᵢ, a sum over the
n = batch·seq rows (tokens; "column-row pairs" in the paper) with g = ∂L/∂y. WTA-CRS keeps k = ⌈budget·n⌉ rows
of x instead of n and estimates the sum without bias:

- probabilities pᵢ ∝ ‖xᵢ‖ (the paper's ‖xᵢ‖·‖gᵢ‖ needs g, which does not exist when forward must decide
  what to keep; any p > 0 where x ≠ 0 keeps the estimator unbiased, only its variance depends on p);
- the *winners* C = {i : pᵢ > 1/k} (at most k−1 rows) are kept exactly — the paper's condition under which
  the winner-take-all estimator has lower variance than plain column-row sampling is Σ_C pᵢ > |C|/k, and each
  row with pᵢ > 1/k increases that margin;
- the other s = k − |C| rows are drawn with replacement from the rest with qⱼ = pⱼ / (1 − P_C), each scaled by
  1 / (s·qⱼ), so E[Σ_sampled gⱼᵀ xⱼ / (s qⱼ)] = Σ_{j∉C} gⱼᵀ xⱼ.

Forward is exact (it uses all of x), and so are ∂L/∂x = g W and the bias gradient; only ∇W is estimated. Saved
per sampled layer: the k scaled rows (compute dtype) and their k indices (int64) instead of x. Applied to every
linear layer of the decoder blocks whose weight trains (attention q/k/v/o, MLP gate/up/down); the LM head stays
exact. Llama-family blocks (Llama, Mistral, Qwen2/3, Phi-3) — the estimate knows which of their saved tensors
only the linear layers keep.

    activations: [{name: wta_crs, budget: 0.3}]
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memfit.activations import _common as c
from memfit.activations import layout as lay
from memfit.compat import fail
from memfit.errors import ConfigError
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Batch, Context, ForwardBackward, TechniqueConfig

INDEX_BYTES = 8  # int64 row indices

_INCOMPATIBLE = {
    "checkpointing": "a checkpointed layer would re-draw its samples when it recomputes",
    "mesa": "both re-store the linear layers' saved inputs",
    "s2a": "both re-store the linear layers' saved inputs",
    "offload": "offloading the sampled rows is not modelled",
    "streambp": "StreamBP rebuilds the layers it runs",
}


def sample_rows(x: torch.Tensor, k: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """WTA-CRS row selection for the (n, d) matrix `x`: (indices (k,), weights (k,)) such that
    Σᵢ weightsᵢ · g[idxᵢ]ᵀ x[idxᵢ] is an unbiased estimate of gᵀ x for any g."""
    n = x.shape[0]
    norms = torch.linalg.vector_norm(x.detach().float(), dim=1)
    total = float(norms.sum())
    p = norms / total if total > 0 else torch.full_like(norms, 1.0 / n)
    if k >= n:
        return torch.arange(n, device=x.device), torch.ones(n, device=x.device)
    winners = (p > 1.0 / k).nonzero().flatten()
    rest = p.clone()
    rest[winners] = 0
    mass = float(rest.sum())
    s = k - winners.numel()
    if mass <= 0:  # every row with weight is a winner: the sum is exact
        return winners, torch.ones(winners.numel(), device=x.device)
    q = rest / mass
    drawn = torch.multinomial(q, s, replacement=True, generator=generator)
    weights = torch.cat([torch.ones(winners.numel(), device=x.device), 1.0 / (s * q[drawn])])
    return torch.cat([winners, drawn]), weights


class WTALinearFn(torch.autograd.Function):
    """y = F.linear(x, weight, bias), saving k sampled, scaled rows of x (and their indices) for ∇W."""

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, generator):
        y = F.linear(x, weight, bias)
        flat = x.detach().reshape(-1, x.shape[-1])
        idx, w = sample_rows(flat, k, generator)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = (flat.index_select(0, idx).float() * w.unsqueeze(1)).to(dtype)
        ctx.save_for_backward(rows, idx, weight)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        rows, idx, weight = ctx.saved_tensors
        shape, dtype = ctx.x_meta
        g = gy.reshape(-1, gy.shape[-1])
        gx = (g @ weight.to(g.dtype)).reshape(shape).to(dtype) if ctx.needs_input_grad[0] else None
        gw = (g.index_select(0, idx).t().to(rows.dtype) @ rows).to(weight.dtype)
        gb = g.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def sample_seed(seed: int, call: int, layer: int) -> int:
    """The sampling seed of one linear layer in one forward (stable across runs: exact resume)."""
    return ((seed * 1_000_003 + call) * 1_000_003 + layer) % 2**62


def kept_rows(tokens: int, budget: float) -> int:
    return min(tokens, max(1, math.ceil(budget * tokens)))


class WTACRSConfig(TechniqueConfig):
    budget: float = Field(0.3, gt=0, le=1, description="fraction of the batch·seq rows each linear layer keeps")
    seed: int | None = Field(None, description="sampling seed (default: the run's)")


class WTACRS(lay.LayoutTechnique):
    name = "wta_crs"
    Config = WTACRSConfig
    needs_gradients = True
    plan_options = ({},)
    conflicts = (*_INCOMPATIBLE, "adapter", "weights")

    @classmethod
    def plan_variants(cls, spec: RunSpec, pretrained: bool = False) -> list[dict]:
        """The default budget, on the Llama-family blocks it models."""
        return super().plan_variants(spec, pretrained) if spec.model.family == "llama" else []

    def __init__(self, config: TechniqueConfig | None = None) -> None:
        super().__init__(config)
        self.calls = 0  # sampled forwards so far (the sampling stream's position: exact resume)
        self.seed = 0
        self.sampled_bytes = 0  # bytes of rows + indices saved by the current forward

    # --- building a run ------------------------------------------------------------------------------------
    def check(self, ctx: Context) -> None:
        family = ctx.spec.model.family
        if family != "llama":
            raise ConfigError(f"wta_crs models Llama-family decoder blocks (Llama, Mistral, Qwen2/3, Phi-3), not "
                              f"'{family}' ones")
        for t in ctx.techniques or []:
            if t is self:
                continue
            if t.name in _INCOMPATIBLE:
                raise ConfigError(f"wta_crs cannot be combined with '{t.name}': {_INCOMPATIBLE[t.name]}; remove "
                                  "one of them")
            if t.slot in ("adapter", "weights"):
                raise ConfigError(f"wta_crs samples the inputs of linear layers whose weights train; with "
                                  f"{t.slot} '{t.name}' the base weights are frozen or re-stored — remove one")

    def apply(self, ctx: Context) -> None:
        self.seed = self.config.seed if self.config.seed is not None else ctx.seed
        self._linears = [m for layer in c.decoder_layers(ctx.model) for m in layer.modules()
                         if isinstance(m, nn.Linear)]
        for index, m in enumerate(self._linears):
            self._wrap(m, index)

    def _wrap(self, module: nn.Linear, index: int) -> None:
        original = module.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not (torch.is_grad_enabled() and module.training and module.weight.requires_grad):
                return original(x)
            n = x.numel() // x.shape[-1]
            gen = torch.Generator(device=x.device).manual_seed(sample_seed(self.seed, self.calls, index))
            k = kept_rows(n, self.config.budget)
            self.sampled_bytes += k * (x.shape[-1] * _saved_dtype_bytes(x) + INDEX_BYTES)
            return WTALinearFn.apply(x, module.weight, module.bias, k, gen)

        module.forward = forward

    def wrap_forward_backward(self, fb: ForwardBackward, ctx: Context) -> ForwardBackward:
        def forward_backward(model: nn.Module, batch: Batch, loss_scale: float) -> torch.Tensor:
            self.sampled_bytes = 0
            loss = fb(model, batch, loss_scale)
            if not self.sampled_bytes and any(m.weight.requires_grad for m in self._linears):
                raise fail("wta_crs: no linear layer of the decoder blocks sampled its input",
                           "nn.Linear modules inside the decoder layers called through their `forward` attribute",
                           ("torch", "transformers"))
            self.calls += 1
            return loss

        return forward_backward

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))

    # --- its memory story ------------------------------------------------------------------------------------
    def shape_layout(self, spec: RunSpec, layout: lay.ActivationLayout) -> lay.ActivationLayout:
        """Each layer keeps its saved tensors minus what only its linear layers kept, plus k sampled rows and
        indices per linear layer."""
        saved = layout.layer - lay.linear_inputs_bytes(spec) + sampled_bytes(spec, self.config.budget)
        return replace(layout, layer=saved, layers=tuple(replace(p, saved=saved) for p in layout.layers))


def _saved_dtype_bytes(x: torch.Tensor) -> int:
    if torch.is_autocast_enabled(x.device.type):
        return torch.finfo(torch.get_autocast_dtype(x.device.type)).bits // 8
    return x.element_size()


def _linears(spec: RunSpec) -> list[int]:
    """in_features of one Llama block's linear layers (q, k, v, o; gate, up, down), fused or not."""
    m, a = spec.model, spec.model.arch
    q_dim = m.n_heads * m.head_dim
    qkv = [m.hidden] if a is not None and a.fused_qkv else [m.hidden] * 3
    gate_up = [m.hidden] if a is not None and a.fused_gate_up else [m.hidden] * 2
    return [*qkv, q_dim, *gate_up, m.intermediate]


def sampled_bytes(spec: RunSpec, budget: float) -> int:
    k = kept_rows(spec.tokens, budget)
    return sum(k * (d * lay.act_bytes(spec) + INDEX_BYTES) for d in _linears(spec))
