"""SwitchLoRA — Zhou, Wang et al. 2024, "SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information".

LoRA's update s·B·A (B: out × r, A: r × in, s = alpha / r) is trained while its *vectors* are switched: each
wrapped linear keeps a frozen candidate pool of `candidates` columns for B and rows for A. After an optimizer step,
each LoRA vector is swapped with a random pool vector with probability p(step) = `switch_rate` · exp(−step /
`decay_steps`) (frequent early, rare late). Switching column i of B from b to c adds s·(b − c)·a_iᵀ to the frozen
weight W, so the layer's output is unchanged at the switch, and over training W accumulates updates along many
directions — full-rank information at LoRA's trainable size. The switched-out vector returns to the pool.

Optimizer state, as the paper prescribes: the switched vector's moments are reset to zero (they described the
old vector), and its counterpart (row i of A for a column of B, and vice versa) is frozen for `freeze_steps`
steps — its moments were accumulated against the old partner. Only A and B train and hold optimizer state; the
pool is frozen (a buffer). Recipe: `adapter: {name: switchlora, r: 8, candidates: 8, switch_rate: 0.1}`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memfit.adapters.peft_tuner import CLS_HEADS, PeftTunerConfig, lora_activation_bytes, resolve_targets
from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import ParamInfo, RunSpec, model_shape
from memfit.techniques.base import AdapterTechnique, Context


class SwitchLoRAConfig(PeftTunerConfig):
    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float | None = Field(None, gt=0, description="scale numerator; default 2*r")
    candidates: int = Field(0, ge=0, description="pool vectors per side of each linear (0 = r)")
    switch_rate: float = Field(0.1, ge=0, le=1, description="probability a vector switches at step 0")
    decay_steps: float = Field(1000.0, gt=0, description="the switching probability decays as exp(-step / this)")
    freeze_steps: int = Field(5, ge=0, description="steps the counterpart of a switched vector stays frozen")


class SwitchLoRALinear(nn.Linear):
    """A frozen linear with a trainable low-rank update and a frozen candidate pool for its vectors."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, pool: int, generator: torch.Generator) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw).uniform_(-bound, bound, generator=generator))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.register_buffer("pool_A", torch.empty(pool, self.in_features, **kw).uniform_(-bound, bound,
                                                                                         generator=generator))
        b_bound = 1.0 / math.sqrt(r)
        self.register_buffer("pool_B", torch.empty(self.out_features, pool, **kw).uniform_(-b_bound, b_bound,
                                                                                          generator=generator))
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the sum is in the frozen linear's output dtype (the compute dtype under autocast), as peft's LoRA returns
        # it: casting to the input's fp32 would keep every tensor after the projections in fp32 under autocast
        result = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        return result + update.to(result.dtype)

    @torch.no_grad()
    def switch_B(self, i: int, j: int) -> None:
        """Column i of B ↔ pool column j; W absorbs s·(b − c)·a_iᵀ so the output does not change."""
        old, new = self.lora_B[:, i].clone(), self.pool_B[:, j].clone()
        self.weight.add_((self.scale * torch.outer(old - new, self.lora_A[i])).to(self.weight.dtype))
        self.lora_B[:, i], self.pool_B[:, j] = new, old

    @torch.no_grad()
    def switch_A(self, i: int, j: int) -> None:
        """Row i of A ↔ pool row j; W absorbs s·b_i·(a − c)ᵀ."""
        old, new = self.lora_A[i].clone(), self.pool_A[j].clone()
        self.weight.add_((self.scale * torch.outer(self.lora_B[:, i], old - new)).to(self.weight.dtype))
        self.lora_A[i], self.pool_A[j] = new, old


def _reset_state(optimizer: torch.optim.Optimizer | None, param: nn.Parameter, index, dim: int) -> None:
    """Zero the optimizer's per-element state of one vector of `param` (Adam's moments; any same-shaped state)."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.select(dim, index).zero_()


class SwitchLoRA(AdapterTechnique):
    name = "switchlora"
    plan_options = ({"r": 16},)
    Config = SwitchLoRAConfig

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.layers: list[SwitchLoRALinear] = []
        self.frozen: dict[tuple[int, str, int], int] = {}  # (layer, "A"|"B", index) -> last step it stays frozen
        self._held: list[tuple[nn.Parameter, int, int, torch.Tensor]] = []
        self.switches = 0

    @property
    def alpha(self) -> float:
        return self.config.alpha if self.config.alpha is not None else 2.0 * self.config.r

    @property
    def pool(self) -> int:
        return self.config.candidates or self.config.r

    def check(self, ctx: Context) -> None:
        if ctx.has_quantized_base():
            raise ConfigError("adapter switchlora merges switched vectors into the base weight, which a quantized "
                              "format cannot take exactly; remove the 'weights' technique")
        if any(t.slot == "step" and getattr(t, "owns_optimizer", False) for t in ctx.techniques or []):
            raise ConfigError("adapter switchlora resets optimizer state when it switches vectors; a zeroth-order "
                              "'step' has no such state — use adapter: lora with it")
        targets = resolve_targets(model_shape(ctx.model).params, self.config.target)
        live = dict(ctx.model.named_modules())
        wrong = [t for t in targets if not isinstance(live.get(t), nn.Linear)]
        if wrong:
            raise ConfigError(f"adapter switchlora wraps nn.Linear layers; {wrong[:3]} are not (name linear layers "
                              "in `target`)")
        r = self.config.r
        small = [t for t in targets if min(live[t].in_features, live[t].out_features) < r]
        if small:
            raise ConfigError(f"adapter switchlora: r={r} exceeds the size of {small[0]}; lower r")

    def apply(self, ctx: Context) -> None:
        model = ctx.model
        targets = resolve_targets(model_shape(model).params, self.config.target)
        for p in model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(ctx.seed)
        for name in targets:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = SwitchLoRALinear(getattr(parent, leaf), self.config.r, self.alpha, self.pool, g)
            setattr(parent, leaf, layer)
            self.layers.append(layer)
        if ctx.spec.task != "causal_lm":
            for head in CLS_HEADS:
                for p in getattr(model, head).parameters() if hasattr(model, head) else ():
                    p.requires_grad_(True)

    # --- switching ----------------------------------------------------------------------------------
    def probability(self, step: int) -> float:
        return self.config.switch_rate * math.exp(-step / self.config.decay_steps)

    def on_step_start(self, ctx: Context) -> None:
        """Hold the frozen counterparts: their values are put back after the optimizer's step."""
        self._held = []
        for (li, side, i), until in list(self.frozen.items()):
            if ctx.step > until:
                del self.frozen[(li, side, i)]
                continue
            layer = self.layers[li]
            param, dim = (layer.lora_A, 0) if side == "A" else (layer.lora_B, 1)
            self._held.append((param, dim, i, param.detach().select(dim, i).clone()))

    def on_step_end(self, ctx: Context, metrics: dict[str, float]) -> None:
        with torch.no_grad():
            for param, dim, i, value in self._held:
                param.select(dim, i).copy_(value)
        self._held = []
        p = self.probability(ctx.step)
        g = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.step)
        switched = 0
        for li, layer in enumerate(self.layers):
            r = self.config.r
            for side in ("B", "A"):
                chosen = (torch.rand(r, generator=g) < p).nonzero().flatten().tolist()
                for i in chosen:
                    j = int(torch.randint(self.pool, (1,), generator=g))
                    if side == "B":
                        layer.switch_B(i, j)
                        _reset_state(ctx.optimizer, layer.lora_B, i, 1)
                        self.frozen[(li, "A", i)] = ctx.step + self.config.freeze_steps
                    else:
                        layer.switch_A(i, j)
                        _reset_state(ctx.optimizer, layer.lora_A, i, 0)
                        self.frozen[(li, "B", i)] = ctx.step + self.config.freeze_steps
                    switched += 1
        self.switches += switched
        metrics["switchlora_switched"] = float(switched)

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": [[li, side, i, until] for (li, side, i), until in self.frozen.items()],
                "switches": self.switches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = {(li, side, i): until for li, side, i, until in state.get("frozen", [])}
        self.switches = state.get("switches", 0)

    # --- estimating ---------------------------------------------------------------------------------
    def transform_spec(self, spec: RunSpec) -> RunSpec:
        m = spec.model
        targets = set(resolve_targets(m.params, self.config.target))
        heads = CLS_HEADS if spec.task != "causal_lm" else ()
        params: list[ParamInfo] = []
        pool_bytes = 0
        r, k = self.config.r, self.pool
        for p in m.params:
            module, _, leaf = p.name.rpartition(".")
            params.append(replace(p, trainable=any(h in p.name.split(".") for h in heads)))
            if module in targets and leaf == "weight":
                out, inp = p.shape
                params += [ParamInfo(f"{module}.lora_A", (r, inp)), ParamInfo(f"{module}.lora_B", (out, r))]
                pool_bytes += k * (inp + out) * 4
        extra = {**spec.extra, "adapter_targets": sorted(targets)}
        return spec.with_(model=replace(m, params=tuple(params), buffers_bytes=m.buffers_bytes + pool_bytes),
                          extra=extra)

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """As LoRA: per wrapped linear, B's backward keeps A's output (`peft_tuner.lora_activation_bytes`); the pool is a buffer."""
        targets = spec.extra.get("adapter_targets", [])
        return base.with_(activations=base.activations + lora_activation_bytes(spec, self.config.r, len(targets)))
