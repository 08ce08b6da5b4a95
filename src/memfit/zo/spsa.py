"""Shared core of zeroth-order training: in-place SPSA with seed-regenerated perturbations.

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes") estimates the gradient of the
loss L at parameters θ from two forward passes,

    ĝ = (L(θ + εz) − L(θ − εz)) / (2ε) · z,   z ~ N(0, I),

perturbing θ *in place* and regenerating z from a seed whenever it is needed, so no perturbation, gradient or copy of
θ is ever stored: training costs the memory of inference. ZO-Bench (Zhang et al. 2024, "Revisiting Zeroth-Order
Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark") builds its variants (sign, momentum, Adam,
block-wise, forward gradient) on the same estimate.

This module holds what all variants share:

- `ZOOptimizer`: a `torch.optim.Optimizer` whose `step(closure)` takes a closure returning the loss (run under
  `torch.no_grad`), draws n-SPSA perturbations, and hands the averaged estimate to `_update_chunk` one chunk at a time;
  subclasses write only that update (and their own state). `lr` schedulers and `state_dict` resume work as usual.
- z is generated chunk by chunk (at most `chunk_elements` values live at once) from a generator seeded by
  (run seed, step, sample, parameter), so the extra memory of a step is a few chunks, whatever the model size.
- **Bit-exact restore** (`exact=True`, float32/float64 parameters): floating-point `(θ + εz) − εz` is not `θ` in
  general (≈45% of elements drift by one ulp after MeZO's +εz, −2εz, +εz), and no in-place scheme can undo an
  arbitrary rounded addition without storing something. We instead keep each trainable tensor on a fixed-point grid
  `g = 2^⌈log2(max|θ| + ε·z_max)⌉ / 2^mantissa` and round every perturbation and update to that grid: all sums are
  then exact integer arithmetic carried in floats, so after ±εz the parameters are *bit-identical*. The price: when
  the optimizer is built, each element is rounded to the grid (a change of at most one ulp of the tensor's largest
  element, i.e. ~6e-8 relative to max|θ| in fp32), and small elements keep absolute rather than relative precision.
  `exact=False` (and any bf16/fp16 tensor) uses plain float arithmetic, as the MeZO reference code does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from memfit.errors import ConfigError, ModelError
from memfit.memory.arch.parts import F32, dtypes, rotary_tables
from memfit.memory.estimate import weight_cast_bytes
from memfit.memory.spec import DTYPE_BYTES, RunSpec

Closure = Callable[[], "torch.Tensor | float"]

Z_MAX = 8.0
"""z is clipped to ±8σ (P(|z| > 8) ≈ 1e-15), so the grid's headroom is finite; the distribution is unchanged in
practice."""

MIN_CHUNK = 1 << 14
CHUNK_FRACTION = 512
"""Default chunk: max(16 Ki elements, trainable elements / 512): z temporaries stay ≤ ~0.2% of the trainable bytes
while big models still get long, GPU-friendly chunks."""

_MANTISSA = {torch.float32: 24, torch.float64: 53}
_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over the parts), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK


def default_chunk_elements(params: Sequence[torch.Tensor]) -> int:
    total = sum(p.numel() for p in params)
    return max(MIN_CHUNK, math.ceil(total / CHUNK_FRACTION))


def chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk):
        yield start, min(start + chunk, numel)


def flat(p: torch.Tensor) -> torch.Tensor:
    """The parameter as a 1-D view (in-place edits reach the parameter)."""
    if not p.is_contiguous():
        raise ModelError("zeroth-order training needs contiguous parameters; call .contiguous() on the model's "
                         "parameters first")
    return p.detach().view(-1)


class ZStream:
    """The z of one (seed, parameter): regenerated chunk by chunk, identical on every pass."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.device = device

    def next(self, n: int) -> torch.Tensor:
        z = torch.randn(n, generator=self.gen, device=self.device, dtype=torch.float32)
        return z.clamp_(-Z_MAX, Z_MAX)


def is_exact_dtype(dtype: torch.dtype) -> bool:
    return dtype in _MANTISSA


def grid_step(p: torch.Tensor, eps: float) -> float:
    """Fixed-point step of `p`: every multiple of it up to max|p| + ε·z_max is exact in `p`'s dtype."""
    lo, hi = torch.aminmax(p.detach())
    reach = max(-float(lo), float(hi)) + eps * Z_MAX
    capacity = 2.0 ** math.ceil(math.log2(reach * (1 + 2.0 ** -20)))
    return capacity / 2.0 ** _MANTISSA[p.dtype]


def snap_(x: torch.Tensor, g: float) -> torch.Tensor:
    """Round `x` in place to a multiple of `g` (a power of two, so the scaling is exact)."""
    return x.div_(g).round_().mul_(g)


def perturb_(params: Sequence[torch.Tensor], seeds: Sequence[int], eps: float, factor: int,
             grids: Sequence[float | None], chunk: int) -> None:
    """θ_j += factor · εz_j in place, z_j regenerated from seeds[j].

    Where `grids[j]` is set, εz_j is rounded to the grid *before* the integer factor is applied, so +1, −2, +1 add
    up to exactly zero."""
    for p, seed, g in zip(params, seeds, grids):
        view = flat(p)
        stream = ZStream(seed, p.device)
        for a, b in chunks(view.numel(), chunk):
            z = stream.next(b - a).mul_(eps)
            if g is not None:
                snap_(z, g)
            view[a:b].add_(z, alpha=factor)
            del z


def parameter_seed(step_seed: int, index: int) -> int:
    return mix_seed(step_seed, index)


class ZOOptimizer(torch.optim.Optimizer):
    """Base of the SPSA optimizers: n-SPSA estimate with in-place ±εz, then a chunked update by the subclass.

    `step(closure)`: `closure()` evaluates the objective (loss, or e.g. −accuracy) at the current parameters; it is
    called under `torch.no_grad` 2·n_spsa times. Returns the mean of L(θ+εz) and L(θ−εz) over the samples.
    Every parameter group is one *block*: ±εz and the update happen for all groups at once (block-wise variants
    override `step`).
    """

    state_names: tuple[str, ...] = ()
    """Per-parameter state tensors of the variant (as many bytes as the parameter each)."""

    def __init__(self, params: Any, lr: float = 1e-6, eps: float = 1e-3, n_spsa: int = 1, weight_decay: float = 0.0,
                 seed: int = 0, exact: bool = True, chunk_elements: int | None = None, **defaults: Any) -> None:
        if not lr >= 0:
            raise ConfigError(f"zeroth-order lr must be ≥ 0, got {lr}")
        if not eps > 0:
            raise ConfigError(f"zeroth-order eps (perturbation scale ε) must be > 0, got {eps}")
        if int(n_spsa) < 1:
            raise ConfigError(f"n_spsa (perturbations averaged per step) must be ≥ 1, got {n_spsa}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be ≥ 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, eps=eps, n_spsa=int(n_spsa), weight_decay=weight_decay, seed=int(seed),
                                      exact=bool(exact), zo_step=0, **defaults))
        all_params = [p for g in self.param_groups for p in g["params"]]
        if not all_params:
            raise ConfigError("zeroth-order optimizer got no parameters; check which parameters require grad")
        self.chunk = int(chunk_elements) if chunk_elements else default_chunk_elements(all_params)
        self._index = {id(p): i for i, p in enumerate(all_params)}
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    g = self._grid(p, group)
                    if g is not None:
                        snap_(flat(p), g)
        self.last_projected: list[float] = []

    # --- pieces subclasses reuse -----------------------------------------------------------------
    def _grid(self, p: torch.Tensor, group: dict) -> float | None:
        if group["exact"] and is_exact_dtype(p.dtype):
            return grid_step(p, group["eps"])
        return None

    def _seeds(self, group: dict, sample: int) -> list[int]:
        step_seed = mix_seed(group["seed"], group["zo_step"], sample)
        return [parameter_seed(step_seed, self._index[id(p)]) for p in group["params"]]

    def perturbation(self, param: torch.Tensor, step: int | None = None, sample: int = 0) -> torch.Tensor:
        """The z (float32, param's shape) that `step`'s `sample`-th estimate uses for `param` (default: next step).

        Materialises z for inspection and tests; the optimizer itself never holds more than a chunk."""
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        step = group["zo_step"] if step is None else step
        seed = parameter_seed(mix_seed(group["seed"], step, sample), self._index[id(param)])
        stream = ZStream(seed, param.device)
        return torch.cat([stream.next(b - a) for a, b in chunks(param.numel(), self.chunk)]).view(param.shape)

    @staticmethod
    def _loss_value(closure: Closure) -> float:
        with torch.no_grad():
            loss = closure()
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def _estimate(self, groups: Sequence[dict], closure: Closure) -> tuple[list[list[list[int]]], list[float], float]:
        """n-SPSA on `groups`: returns seeds[sample][group][param], projected gradients per sample, mean loss."""
        n = groups[0]["n_spsa"]
        eps = groups[0]["eps"]
        grids = [[self._grid(p, g) for p in g["params"]] for g in groups]
        all_seeds, projected, losses = [], [], []
        for i in range(n):
            seeds = [self._seeds(g, i) for g in groups]
            for g, s, gr in zip(groups, seeds, grids):
                perturb_(g["params"], s, eps, 1, gr, self.chunk)
            plus = self._loss_value(closure)
            for g, s, gr in zip(groups, seeds, grids):
                perturb_(g["params"], s, eps, -2, gr, self.chunk)
            minus = self._loss_value(closure)
            for g, s, gr in zip(groups, seeds, grids):
                perturb_(g["params"], s, eps, 1, gr, self.chunk)
            all_seeds.append(seeds)
            projected.append((plus - minus) / (2 * eps))
            losses += [plus, minus]
        return all_seeds, projected, sum(losses) / len(losses)

    def _apply_update(self, groups: Sequence[dict], seeds: list[list[list[int]]], projected: list[float]) -> None:
        """Rebuild ĝ = mean_i proj_i · z_i chunk by chunk and let the subclass update each chunk."""
        n = len(projected)
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                view = flat(p)
                streams = [ZStream(seeds[i][gi][pi], p.device) for i in range(n)]
                grid = self._grid(p, group)
                state = self._state_of(p)
                views = {k: flat(state[k]) for k in self.state_names}
                for a, b in chunks(view.numel(), self.chunk):
                    est = streams[0].next(b - a).mul_(projected[0] / n)
                    for i in range(1, n):
                        est.add_(streams[i].next(b - a), alpha=projected[i] / n)
                    chunk_state = {k: v[a:b] for k, v in views.items()}
                    self._update_chunk(view[a:b], est, chunk_state, group)
                    if grid is not None:
                        snap_(view[a:b], grid)
                    del est

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        for k in self.state_names:
            if k not in state:
                state[k] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

    def _update_chunk(self, param: torch.Tensor, est: torch.Tensor, state: dict[str, torch.Tensor],
                      group: dict) -> None:
        """Update `param` (a chunk view) from the gradient estimate `est` (a temporary the method may overwrite)."""
        raise NotImplementedError

    @staticmethod
    def _decay_(param: torch.Tensor, group: dict) -> None:
        if group["weight_decay"]:
            param.mul_(1 - group["lr"] * group["weight_decay"])

    def _blocks(self) -> list[list[dict]]:
        """The groups perturbed together, one estimate and update each per step (default: all at once)."""
        return [self.param_groups]

    # --- the optimizer API -----------------------------------------------------------------------
    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise ConfigError(f"{type(self).__name__}.step needs a closure that returns the loss (no backward)")
        losses = []
        with torch.no_grad():
            for groups in self._blocks():
                seeds, projected, loss = self._estimate(groups, closure)
                self._update(groups, seeds, projected)
                losses.append(loss)
                self.last_projected = projected
            for g in self.param_groups:
                g["zo_step"] += 1
        return sum(losses) / len(losses)

    # The closure's forward passes are activations, not optimizer memory: only the update runs inside the
    # optimizer step hooks (which memory trackers and profilers use to attribute optimizer work).
    step.hooked = True  # type: ignore[attr-defined]

    @torch.optim.Optimizer.profile_hook_step
    def _update(self, groups: Sequence[dict], seeds: list[list[list[int]]], projected: list[float]) -> None:
        self._apply_update(groups, seeds, projected)


# --- blocks, objectives and estimates shared by the step techniques ------------------------------
_BLOCK = re.compile(r"^(.*?\.(?:layers?|h|blocks?)\.\d+)\.")


def block_of(name: str) -> str:
    """The block a parameter belongs to: its transformer layer (`…layers.3`), else its top-level module."""
    m = _BLOCK.match(name)
    if m:
        return m.group(1)
    parts = name.split(".")
    # peft wraps models as base_model.model.<...>; skip the wrappers
    while len(parts) > 2 and parts[0] in ("base_model", "model"):
        parts = parts[1:]
    return parts[0]


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def block_groups(model: nn.Module) -> list[dict]:
    """Trainable parameters as one param group per block (layer), in model order."""
    groups: dict[str, dict] = {}
    for name, p in trainable_named(model):
        groups.setdefault(block_of(name), {"params": [], "names": [], "block": block_of(name)})
        groups[block_of(name)]["params"].append(p)
        groups[block_of(name)]["names"].append(name)
    return list(groups.values())


def inference_activation_bytes(spec: RunSpec) -> int:
    """Peak transient bytes of one no-grad forward: the residual stream, one layer's widest intermediates, the head.

    Nothing is saved for backward, so only what one layer holds at once is live (and the head's logits); for a
    Llama-family decoder the moments are read off the tensors alive in transformers' forward
    (`llama_no_grad_moments`)."""
    m = spec.model
    if spec.task == "causal_lm" and m.family in ("llama", "gemma") and spec.attn_impl != "eager":
        return max(llama_no_grad_moments(spec).values()) + weight_cast_bytes(spec)  # (casts already made there)
    b = DTYPE_BYTES[spec.compute_dtype]
    tokens = spec.tokens
    attn = 4 * m.hidden + 2 * m.n_heads * m.head_dim
    mlp = (4 if m.family == "llama" else 2) * m.intermediate + m.hidden  # gate, up, act, act·up (GELU: 2)
    layer = tokens * (2 * m.hidden + max(attn, mlp)) * b
    if spec.attn_impl == "eager":
        layer += 2 * spec.batch * m.n_heads * spec.seq * spec.seq * b
    if spec.task == "causal_lm":  # logits, their fp32 copy (when computed in 16 bits) and log-softmax (fp32)
        head = tokens * m.vocab * (b + (4 if b != 4 else 0) + 4)
    else:
        head = tokens * m.hidden * b + spec.batch * max(m.num_labels, 2) * 4 * 2
    # under autocast every matmul weight's cast copy is cached until the forward ends (no_grad or not)
    return max(layer, head + tokens * m.hidden * b) + weight_cast_bytes(spec)


def llama_no_grad_moments(spec: RunSpec) -> dict[str, int]:
    """Tensors alive at the two moments a no-grad forward of a Llama-family causal LM peaks, besides autocast's
    cached weight casts (all of them at the head; the last down projection's and the head's not yet at the MLP):

    - `mlp`: the last block's product `down_proj` reads, with act's output and up's (gate's is freed), the block's
      input, the residual after attention and the norm's output (its cast copy is freed with gate's matmul), the
      embeddings' output, the position ids, rotary cos/sin and the KV cache of every layer (the forward runs with
      `use_cache`; keys leave the rotary in the residual's dtype);
    - `head`: the normed last hidden state (its cast copy is freed with the head's matmul), the logits, their fp32
      copy and log-softmax, the KV cache, the labels padded and shifted, the loss's scalars."""
    m, d = spec.model, dtypes(spec)
    t, r, c = spec.tokens, d.residual, d.compute
    # keys leave the rotary in the residual's dtype (cos/sin are kept in it), values in the compute dtype
    kv = m.n_layers * t * m.n_kv_heads * m.head_dim * (r + c)
    rotary = m.arch.rotary_dim if m.arch is not None else m.head_dim
    hidden = t * m.hidden * r
    inputs = hidden + spec.seq * 8 + rotary_tables(spec.seq, rotary, d) + kv
    mlp = inputs + (3 if m.n_layers > 1 else 2) * hidden + 3 * t * m.intermediate * c
    logits = t * m.vocab * (c + (4 if c != 4 else 0) + 4)
    labels = spec.batch * (spec.seq + 1) * 8 + t * 8 + 2 * F32  # padded, then shifted; the loss's scalars
    head = hidden + logits + kv + labels
    if d.autocast:  # the last down projection's and the LM head's weights are cast (and cached) after the MLP moment
        mlp -= (m.hidden * m.intermediate + m.vocab * m.hidden) * c
    return {"mlp": mlp, "head": head}


def chunk_bytes(spec: RunSpec, n_spsa: int = 1) -> int:
    """Temporaries of a step: the estimate chunk plus one z chunk when averaging several samples."""
    trainable = spec.model.trainable
    if not trainable:
        return 0
    chunk = max(MIN_CHUNK, math.ceil(sum(p.numel for p in trainable) / CHUNK_FRACTION))
    return min(chunk, max(p.numel for p in trainable)) * 4 * (2 if n_spsa > 1 else 1)
