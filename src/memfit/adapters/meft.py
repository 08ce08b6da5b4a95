"""MEFT — Liao, Tan & Monz 2023, "Make Pre-trained Model Reversible: From Parameter to Memory Efficient
Fine-Tuning" (NeurIPS 2023).

The frozen layers L_1..L_N become a *reversible* two-stream network with adapters (the paper's MEFT₁ form):

    y¹ = λ·a + F_n(b),   F_n(x) = L_n(x) + A_n(x)      (the pre-trained layer plus a parallel adapter)
    y² = β·b + G_n(y¹),  G_n    = bottleneck adapter
    (a, b) ← (y², y¹)                                    (the streams swap, so b follows the pre-trained chain)

starting from a = b = the embeddings' output; the last b feeds the final norm and head (so the last layer has no
G, whose y² would reach nothing). Adapters' up-projections
start at zero and λ is small (default 0.1), so training starts near the pre-trained model. Every step is
invertible — b = (y² − G_n(y¹))/β, a = (y¹ − F_n(b))/λ — so forward keeps only the two final streams and
backward rebuilds each layer's input from its output, recomputes that one layer with a graph and back-propagates
through it (`ReversibleStack`, one autograd function over the whole stack). Activation memory does not grow with
depth. Dropout inside the layers is switched off (recomputation must reproduce the forward); the final norm and a
classification head train (a causal LM head with `train_head: true`).

Departure from the paper: the reconstruction divides by λ, which amplifies rounding in low precision (the paper
discusses the same trade-off); memfit refuses λ < 0.01 and the gradient test is exact in fp64.
Recipe: `adapter: {name: meft, reduction: 8, lam: 0.1, beta: 1.0}`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memfit.activations._common import decoder_layers
from memfit.adapters.sherl import FINAL_NORMS, final_norm
from memfit.adapters.side import (
    SideConfig,
    backbone_head_bytes,
    check_tied_head,
    is_head_param,
    side_param_infos,
    text_config,
    unfreeze_head,
    wants_head,
)
from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.estimate import backprop_phases, fixed_bytes, layer_components
from memfit.memory.spec import RunSpec
from memfit.techniques.base import AdapterTechnique, Context

ADAPTER_F, ADAPTER_G = "meft_f", "meft_g"


class MEFTConfig(SideConfig):
    lam: float = Field(0.1, ge=0.01, le=1.0, description="λ: weight of the carried stream in y¹ (small: near the "
                                                          "pre-trained model; the inverse divides by it)")
    beta: float = Field(1.0, gt=0.0, le=1.0, description="β: weight of the carried stream in y²")


class Bottleneck(nn.Module):
    """down → GELU → up, up zero-initialised."""

    def __init__(self, hidden: int, d: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, d)
        self.up = nn.Linear(d, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))


class Coupling:
    """The N coupled layers of one call: F_n and G_n with the call's other arguments bound."""

    def __init__(self, layers, forwards, args: tuple, kwargs: dict, lam: float, beta: float) -> None:
        self.layers, self.forwards, self.args, self.kwargs = layers, forwards, args, kwargs
        self.lam, self.beta = lam, beta

    def f(self, n: int, x: torch.Tensor) -> torch.Tensor:
        out = self.forwards[n](x, *self.args, **self.kwargs)
        if not isinstance(out, torch.Tensor):
            from memfit.compat import fail

            raise fail(f"adapter 'meft': layer {n} returned {type(out).__name__}",
                       "decoder/encoder layers that return the hidden-states tensor", ("transformers",))
        return out + getattr(self.layers[n], ADAPTER_F)(x)

    def g(self, n: int, y: torch.Tensor) -> torch.Tensor:
        """G_n(y); zero for the last layer, whose y² never reaches the output (no adapter is built there)."""
        adapter = getattr(self.layers[n], ADAPTER_G, None)
        return adapter(y) if adapter is not None else torch.zeros_like(y)

    def step(self, n: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y1 = self.lam * a + self.f(n, b)
        y2 = self.beta * b + self.g(n, y1)
        return y2, y1

    def adapter_params(self, n: int, name: str) -> list[nn.Parameter]:
        adapter = getattr(self.layers[n], name, None)
        return [p for p in adapter.parameters() if p.requires_grad] if adapter is not None else []

    def params(self) -> list[nn.Parameter]:
        return [p for n in range(len(self.layers)) for name in (ADAPTER_F, ADAPTER_G)
                for p in self.adapter_params(n, name)]


def coupled_forward(x: torch.Tensor, coupling: Coupling) -> torch.Tensor:
    """The same network with ordinary autograd (every layer's activations kept): the reference for the test."""
    a = b = x
    for n in range(len(coupling.layers)):
        a, b = coupling.step(n, a, b)
    return b


class ReversibleStack(torch.autograd.Function):
    """Forward without a graph, keeping (a, b) of the last layer; backward inverts layer by layer."""

    @staticmethod
    def forward(ctx, x, coupling: Coupling, *params):
        with torch.no_grad():
            a = b = x
            for n in range(len(coupling.layers)):
                a, b = coupling.step(n, a, b)
        ctx.coupling = coupling
        ctx.save_for_backward(a, b)
        return b

    @staticmethod
    def backward(ctx, grad_b):
        c: Coupling = ctx.coupling
        a, b = ctx.saved_tensors
        params = c.params()
        grads = [torch.zeros_like(p) for p in params]
        da, db = torch.zeros_like(a), grad_b
        for n in reversed(range(len(c.layers))):
            y1, y2, dy1, dy2 = b, a, db, da
            g_params, f_params = c.adapter_params(n, ADAPTER_G), c.adapter_params(n, ADAPTER_F)
            with torch.enable_grad():
                y1_ = y1.detach().requires_grad_(True)
                g = c.g(n, y1_)
                back = torch.autograd.grad(g, [y1_, *g_params], dy2) if g_params else (None,)
            if back[0] is not None:
                dy1 = dy1 + back[0]
            b_prev = (y2 - g.detach()) / c.beta
            del g
            with torch.enable_grad():
                b_ = b_prev.detach().requires_grad_(True)
                f = c.f(n, b_)
                back_f = torch.autograd.grad(f, [b_, *f_params], dy1)
            a_prev = (y1 - f.detach()) / c.lam
            del f
            _accumulate(params, grads, g_params, back[1:])
            _accumulate(params, grads, f_params, back_f[1:])
            a, b = a_prev, b_prev
            da, db = c.lam * dy1, c.beta * dy2 + back_f[0]
        return (da + db, None, *grads)


def _accumulate(params, grads, these, values) -> None:
    index = {id(p): i for i, p in enumerate(params)}
    for p, v in zip(these, values):
        grads[index[id(p)]].add_(v)


@contextmanager
def _eval(layers):
    """Recomputation must reproduce the forward: the layers run without dropout."""
    modes = [m.training for m in layers]
    for m in layers:
        m.train(False)
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


class MEFT(AdapterTechnique):
    name = "meft"
    Config = MEFTConfig
    # layer-level activation techniques (the stack already recomputes every layer) and a quantized base
    conflicts = ("checkpointing", "offload", "mesa", "s2a", "streambp", "weights")

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.calls = 0
        self.reversible = True  # False: the same network through ordinary autograd (the gradient test's reference)

    def train_head(self, task: str) -> bool:
        return wants_head(self.config.train_head, task)

    def width(self, hidden: int) -> int:
        return max(hidden // self.config.reduction, 4)

    def check(self, ctx: Context) -> None:
        if not hasattr(ctx.model, "config"):
            raise ConfigError("adapter meft needs a transformers model (with .config)")
        if ctx.has_quantized_base():
            raise ConfigError("adapter meft inverts the frozen layers in full precision; remove the 'weights' "
                              "technique (a quantized base cannot be inverted exactly)")
        if any(t.slot == "activations" and t.name in self.conflicts for t in ctx.techniques or []):
            raise ConfigError("adapter meft already recomputes every layer from its output (activations independent"
                              " of depth); remove the layer-level 'activations' technique (checkpointing, offload, "
                              "mesa, s2a, streambp)")
        decoder_layers(ctx.model)
        check_tied_head(ctx.model, ctx.spec.task, self.train_head(ctx.spec.task), self.name)

    def apply(self, ctx: Context) -> None:
        model = ctx.model
        layers = list(decoder_layers(model))
        for p in model.parameters():
            p.requires_grad_(False)
        hidden = text_config(model).hidden_size
        ref = next(layers[0].parameters())  # adapters in the layers' dtype: the coupling adds them to its output
        for i, layer in enumerate(layers):
            for name in (ADAPTER_F, ADAPTER_G) if i < len(layers) - 1 else (ADAPTER_F,):
                layer.add_module(name, Bottleneck(hidden, self.width(hidden)).to(ref.device, ref.dtype))
        for p in final_norm(model):
            p.requires_grad_(True)
        if self.train_head(ctx.spec.task):
            unfreeze_head(model, ctx.spec.task)
        forwards = [type(layer).forward.__get__(layer) for layer in layers]
        lam, beta = self.config.lam, self.config.beta

        def run_stack(hidden_states, *args, **kwargs):
            from transformers.cache_utils import Cache

            kwargs = {k: (None if isinstance(v, Cache) else v) for k, v in kwargs.items()}
            coupling = Coupling(layers, forwards, args, kwargs, lam, beta)
            self.calls += 1
            with _eval(layers):
                if not self.reversible:
                    return coupled_forward(hidden_states, coupling)
                return ReversibleStack.apply(hidden_states, coupling, *coupling.params())

        layers[0].forward = run_stack
        for layer in layers[1:]:
            layer.forward = _pass_through

    def on_step_end(self, ctx: Context, metrics: dict[str, float]) -> None:
        if not self.calls:
            from memfit.compat import fail

            raise fail("adapter 'meft': the reversible stack never ran during a step",
                       "the model to call its first layer's forward (replaced by the reversible stack)",
                       ("torch", "transformers"))

    # --- estimating ---------------------------------------------------------------------------------
    def transform_spec(self, spec: RunSpec) -> RunSpec:
        m = spec.model
        train_head = self.train_head(spec.task)

        def trains(name: str) -> bool:
            parts = name.split(".")
            return (len(parts) >= 2 and parts[-2] in FINAL_NORMS and not any(p.isdigit() for p in parts)) or (
                train_head and is_head_param(name, spec.task))

        params = tuple(replace(p, trainable=trains(p.name)) for p in m.params)
        prefix, bpe = _layer_prefix(m.params)
        extra = []
        with torch.device("meta"):
            for i in range(m.n_layers):
                for name in (ADAPTER_F, ADAPTER_G) if i < m.n_layers - 1 else (ADAPTER_F,):
                    extra += [replace(p, bytes_per_element=bpe) for p in side_param_infos(
                        Bottleneck(m.hidden, self.width(m.hidden)), f"{prefix}{i}.{name}.")]
        return spec.with_(model=replace(m, params=params + tuple(extra)))

    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """Activations: the two final streams, the layers' arguments the stack keeps for recomputation (a
        decoder's rotary tables, counted by `backbone_head_bytes`, and its int64 positions) and what the backbone's
        head keeps — independent of the number of layers. A decoder's final norm reads stream b (counted once)."""
        t, h = spec.tokens, spec.model.hidden
        decoder = spec.task == "causal_lm"
        streams = (t * h * 4 + spec.seq * 8) if decoder else 2 * t * h * 4
        return base.with_(activations=streams + backbone_head_bytes(spec, self.train_head(spec.task)),
                          temporaries=self.backward_temporaries(spec))

    def backward_temporaries(self, spec: RunSpec) -> int:
        """Inside the reversible backward: one layer recomputed with its graph (a block's saved tensors, as plain
        backprop keeps them — conservative where the layers' dropout masks are counted, since the stack runs
        them without dropout), one rebuilt stream, and the adapters' gradients, accumulated until it returns."""
        adapters = sum(p.nbytes for p in spec.model.params if ADAPTER_F in p.name or ADAPTER_G in p.name)
        return sum(layer_components(spec).values()) + spec.tokens * spec.model.hidden * 4 + adapters

    def step_phases(self, spec: RunSpec, breakdown: MemoryBreakdown) -> dict[str, int]:
        """Plain backprop's phases plus the reversible backward: weights, state, the kept streams and head, the
        head's gradients, and the layer being recomputed."""
        phases = backprop_phases(spec, breakdown)
        head_grads = sum(p.nbytes for p in spec.model.trainable if ADAPTER_F not in p.name
                         and ADAPTER_G not in p.name)
        phases["reversible_backward"] = (fixed_bytes(breakdown) + breakdown.activations + head_grads
                                         + breakdown.temporaries)
        return phases


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def _layer_prefix(params) -> tuple[str, float]:
    """(`model.layers.` / `bert.encoder.layer.`: the name before the first block index, that block's bytes per
    element)."""
    for p in params:
        parts = p.name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                return ".".join(parts[:i]) + ".", p.bytes_per_element
    raise ConfigError("adapter meft: no numbered layers in this model's parameters")
