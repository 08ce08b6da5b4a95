"""ZO2 — Wang, Chen, Li, Chen, Gao et al. 2025, "ZO2: Scalable Zeroth-Order Fine-Tuning for Extremely Large Language
Models with Limited GPU Memory" (OPT-175B fine-tuned with MeZO in 18 GB).

MeZO's two perturbed forwards, L(θ+εz) and L(θ−εz), with the decoder blocks' weights kept off the compute device
and brought in one block at a time. The point of ZO2 is that both forwards share one upload of each block: the
two hidden-state streams advance together, block by block — the block is uploaded, perturbed +εz, run on the
"+" stream, perturbed −2εz, run on the "−" stream, restored (+εz), written back — and the previous step's update
(known only once both losses are) is applied to a block the next time it is uploaded, so a block moves once per
step. On this project's CPU machines the "device" is the process's tensors and the "host" is a memory-mapped
safetensors file on disk (`offload_dir`): the model's parameters held in memory are one block plus what is not in a
block (embeddings, final norm, head).

Exactness: the perturbations, their seeds, the fixed-point grid and the update are MeZO's own (`zo/spsa.py`), in the
same order per parameter, so the losses and weights are bit-identical to in-memory MeZO with the same seed (tested).
Every module with parameters runs the two streams separately (the two halves of a doubled batch), so no matmul
sees a different batch shape than MeZO's. Scope: causal-LM loss objective, one perturbation (`n_spsa: 1`), one
micro-batch per step. Checkpoints work through the model's `state_dict` / `load_state_dict`: hooks on every
block read it from (and write it to) the file, after applying pending updates.

    step: {name: zo2, lr: 1e-6, eps: 1e-3, offload_dir: /fast/disk/zo2}
"""

from __future__ import annotations

import functools
import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import save_file
from torch import nn

from memfit.activations._common import decoder_layers
from memfit.errors import ConfigError
from memfit.memory.breakdown import MemoryBreakdown
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context, ForwardBackward, TrainStep
from memfit.zo.spsa import (
    chunks,
    default_chunk_elements,
    flat,
    grid_step,
    inference_activation_bytes,
    is_exact_dtype,
    mix_seed,
    parameter_seed,
    perturb_,
    snap_,
    trainable_named,
    ZStream,
    block_of,
)
from memfit.zo.technique import ZOConfig, ZOStepTechnique

_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class BlockStore:
    """Every decoder block's parameters in one safetensors file, opened as a writable memory map: `load(i)` copies
    block i into the resident tensors, `store(i)` writes them back. The copies go through numpy: the mapped file
    is page cache (file-backed, reclaimable by the OS), not tensors of this process's allocator."""

    def __init__(self, path: Path, blocks: list[dict[str, torch.Tensor]]) -> None:
        self.path = path
        save_file({f"{i}.{k}": v.detach().contiguous() for i, b in enumerate(blocks) for k, v in b.items()}, path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.map = np.memmap(path, dtype=np.uint8, mode="r+")
        self.views: list[dict[str, np.ndarray]] = []
        for i, b in enumerate(blocks):
            views = {}
            for k, v in b.items():
                start, end = header[f"{i}.{k}"]["data_offsets"]
                raw = self.map[8 + n + start:8 + n + end].view(_NP[v.dtype]).reshape(tuple(v.shape))
                views[k] = raw
            self.views.append(views)
        self.loads = 0

    def load(self, i: int, resident: dict[str, torch.Tensor]) -> None:
        for k, t in resident.items():
            np.copyto(t.detach().numpy(), self.views[i][k])
        self.loads += 1

    def store(self, i: int, resident: dict[str, torch.Tensor]) -> None:
        for k, t in resident.items():
            np.copyto(self.views[i][k], t.detach().numpy())


class _Unit:
    """A module with parameters that runs each stream separately: a streamed block (`index` ≥ 0) or a resident
    module (embeddings, norm, head). `params`: (global MeZO index, parameter) of its trainable ones."""

    def __init__(self, module: nn.Module, params: list[tuple[int, nn.Parameter]], index: int = -1) -> None:
        self.module, self.params, self.index = module, params, index
        self.step_done = 0  # steps whose update this unit has received


class ZO2Optimizer(torch.optim.Optimizer):
    """Holds lr / eps / weight decay / the step counter for schedules and checkpoints; `step(closure)` runs the
    dual forward through `closure` (which returns the two losses) and records the update every unit applies the
    next time it runs."""

    def __init__(self, params, lr: float, eps: float, weight_decay: float, seed: int, exact: bool,
                 chunk: int) -> None:
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, exact=exact, zo_step=0))
        self.chunk = chunk
        self.pending: list[tuple[int, float, float]] = []  # (zo_step, projected gradient, lr) not yet applied
        self.dual = False

    @property
    def group(self) -> dict:
        return self.param_groups[0]

    def step(self, closure=None) -> float:  # type: ignore[override]
        if closure is None:
            raise ConfigError("ZO2Optimizer.step needs the dual-forward closure")
        with torch.no_grad():
            self.dual = True
            try:
                plus, minus = closure()
            finally:
                self.dual = False
        g = self.group
        self.pending.append((g["zo_step"], (plus - minus) / (2 * g["eps"]), g["lr"]))
        g["zo_step"] += 1
        return (plus + minus) / 2

    # the closure's forwards are activations, not optimizer memory (as in `ZOOptimizer.step`)
    step.hooked = True  # type: ignore[attr-defined]

    # --- what a unit does when it runs ----------------------------------------------------------------------
    def _grid(self, p: torch.Tensor) -> float | None:
        return grid_step(p, self.group["eps"]) if self.group["exact"] and is_exact_dtype(p.dtype) else None

    def _seeds(self, unit: _Unit, step: int) -> list[int]:
        step_seed = mix_seed(self.group["seed"], step, 0)
        return [parameter_seed(step_seed, i) for i, _ in unit.params]

    def catch_up(self, unit: _Unit) -> None:
        """Apply the updates of finished steps this unit has not received (MeZO's `_apply_update`, per unit)."""
        for step, projected, lr in self.pending:
            if step < unit.step_done:
                continue
            for (_, p), seed in zip(unit.params, self._seeds(unit, step)):
                view, stream, grid = flat(p), ZStream(seed, p.device), self._grid(p)
                for a, b in chunks(view.numel(), self.chunk):
                    est = stream.next(b - a).mul_(projected)
                    if self.group["weight_decay"]:
                        view[a:b].mul_(1 - lr * self.group["weight_decay"])
                    view[a:b].add_(est, alpha=-lr)
                    if grid is not None:
                        snap_(view[a:b], grid)
            unit.step_done = step + 1

    def dual_forward(self, unit: _Unit, run, first: tuple, second: tuple):
        """`run(*first)` at θ+εz and `run(*second)` at θ−εz; the unit's parameters end at θ, bit for bit."""
        params = [p for _, p in unit.params]
        seeds = self._seeds(unit, self.group["zo_step"])
        grids = [self._grid(p) for p in params]
        eps = self.group["eps"]
        perturb_(params, seeds, eps, 1, grids, self.chunk)
        plus = run(*first)
        perturb_(params, seeds, eps, -2, grids, self.chunk)
        minus = run(*second)
        perturb_(params, seeds, eps, 1, grids, self.chunk)
        return plus, minus

    def forget_applied(self, units: list[_Unit]) -> None:
        done = min(u.step_done for u in units)
        self.pending = [x for x in self.pending if x[0] >= done]


def _split(value: Any, rows: int) -> tuple[Any, Any]:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2 * rows:
        return value[:rows], value[rows:]
    return value, value


def _join(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, tuple):
        return tuple(_join(x, y) for x, y in zip(a, b))
    return a


class ZO2Config(ZOConfig):
    offload_dir: str | None = Field(None, description="folder for the blocks' file (default: a temporary folder)")


class ZO2Step(ZOStepTechnique):
    name = "zo2"
    Config = ZO2Config
    plan_options = ({},)
    tasks = ("causal_lm",)
    conflicts = ("activations", "adapter", "weights")  # no backward; streams the model's own weights

    @classmethod
    def plan_variants(cls, spec: RunSpec, pretrained: bool = False) -> list[dict[str, Any]]:
        """What `check` / `apply` refuse that the spec already tells: an accelerator (the upload is not built),
        accumulated micro-batches, a tied embedding / head."""
        if spec.extra.get("device", "cpu") != "cpu" or spec.grad_accum > 1 or spec.model.tie_embeddings:
            return []
        return super().plan_variants(spec, pretrained)

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        c = self.config
        if ctx.spec.task != "causal_lm" or c.objective != "loss":
            raise ConfigError("zo2 streams a causal LM's blocks for the loss objective; use step: mezo for "
                              f"task '{ctx.spec.task}' / objective '{c.objective}'")
        if c.n_spsa != 1:
            raise ConfigError("zo2 runs one perturbation per step (both forwards share each block's upload); set "
                              "n_spsa: 1")
        if ctx.spec.grad_accum > 1:
            raise ConfigError("zo2 runs one micro-batch per step; set train.grad_accum: 1")
        if ctx.device.type != "cpu" or any(p.device.type != "cpu" for p in ctx.model.parameters()):
            raise ConfigError("zo2 here streams blocks from a memory-mapped file into CPU tensors; the upload to an "
                              f"accelerator ({ctx.device}) is not built — use step: mezo on {ctx.device.type}")
        for t in ctx.techniques or []:
            if t.slot in ("adapter", "weights"):
                raise ConfigError(f"zo2 streams the model's own trainable weights; it cannot be combined with "
                                  f"{t.slot} '{t.name}' — use step: mezo with it")

    def apply(self, ctx: Context) -> None:
        """Snap every trainable tensor to MeZO's grid, write the blocks to disk and point every block's parameters
        at one resident block."""
        c = self.config
        model = ctx.model
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            raise ConfigError("zo2 updates each module's parameters where the module runs; a tied embedding/head "
                              "would be updated twice — untie them or use step: mezo")
        named = trainable_named(model)
        index = {id(p): i for i, (_, p) in enumerate(named)}
        with torch.no_grad():
            for _, p in named:
                if c.exact and is_exact_dtype(p.dtype):
                    snap_(flat(p), grid_step(p, c.eps))
        self.chunk = default_chunk_elements([p for _, p in named])
        layers = list(decoder_layers(model))
        names = [n for n, _ in layers[0].named_parameters()]
        if any([n for n, _ in layer.named_parameters()] != names for layer in layers):
            raise ConfigError("zo2 needs decoder blocks of one shape (their parameters share one resident block)")
        folder = Path(c.offload_dir) if c.offload_dir else Path(tempfile.mkdtemp(prefix="memfit-zo2-"))
        folder.mkdir(parents=True, exist_ok=True)
        self.store = BlockStore(folder / "blocks.safetensors", [dict(layer.named_parameters()) for layer in layers])
        self.resident = {n: torch.empty_like(p) for n, p in layers[0].named_parameters()}
        in_blocks = set()
        self.units: list[_Unit] = []
        for i, layer in enumerate(layers):
            params = []
            for n, p in layer.named_parameters():
                in_blocks.add(id(p))
                p.data = self.resident[n]
                if id(p) in index:
                    params.append((index[id(p)], p))
            self.units.append(_Unit(layer, params, i))
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in in_blocks]
            if own:
                self.units.append(_Unit(module, [(index[id(p)], p) for p in own if id(p) in index]))
        self.loaded = -1
        for unit in self.units:
            self._wrap(unit)
            unit.module._register_state_dict_hook(functools.partial(self._state_hook, unit))
            if unit.index >= 0:
                unit.module._register_load_state_dict_pre_hook(functools.partial(self._load_hook, unit))
        self.optimizer_: ZO2Optimizer | None = None

    # --- checkpoints: the model's state_dict reads the blocks from the file, loading writes them there ----------
    def _state_hook(self, unit: _Unit, module, state_dict, prefix, local_metadata) -> None:
        if self.optimizer_ is not None:
            with torch.no_grad():
                self._upload(unit)
                self.optimizer_.catch_up(unit)
                self._writeback(unit)
        if unit.index >= 0:
            for k, view in self.store.views[unit.index].items():
                state_dict[prefix + k] = torch.from_numpy(view.copy())

    def _load_hook(self, unit: _Unit, state_dict, prefix, *args) -> None:
        for k, view in self.store.views[unit.index].items():
            if prefix + k in state_dict:
                np.copyto(view, state_dict[prefix + k].detach().cpu().numpy())
        self.loaded = -1  # the resident block no longer holds what `loaded` says

    def _wrap(self, unit: _Unit) -> None:
        original = unit.module.forward

        def forward(*args, **kwargs):
            opt = self.optimizer_
            self._upload(unit)
            if opt is not None:
                opt.catch_up(unit)
            if opt is None or not opt.dual:
                out = original(*args, **kwargs)
                self._writeback(unit)
                return out
            rows = self._rows
            split_args = [_split(a, rows) for a in args]
            split_kw = {k: _split(v, rows) for k, v in kwargs.items()}
            first = (tuple(a for a, _ in split_args), {k: a for k, (a, _) in split_kw.items()})
            second = (tuple(b for _, b in split_args), {k: b for k, (_, b) in split_kw.items()})
            plus, minus = opt.dual_forward(unit, lambda a, kw: original(*a, **kw), first, second)
            self._writeback(unit)
            return _join(plus, minus)

        unit.module.forward = forward

    def _upload(self, unit: _Unit) -> None:
        if unit.index >= 0 and self.loaded != unit.index:
            self.store.load(unit.index, self.resident)
            self.loaded = unit.index

    def _writeback(self, unit: _Unit) -> None:
        if unit.index >= 0:
            self.store.store(unit.index, self.resident)

    def build_optimizer(self, ctx: Context) -> torch.optim.Optimizer:
        c = self.config
        params = [p for _, p in trainable_named(ctx.model)]
        self.optimizer_ = ZO2Optimizer(params, c.lr, c.eps, c.weight_decay, self._seed(ctx), c.exact, self.chunk)
        return self.optimizer_

    def make_train_step(self, ctx: Context, forward_backward: ForwardBackward) -> TrainStep:
        model = ctx.model
        opt = self.build_optimizer(ctx)
        ctx.optimizer = opt

        def train_step(micro_batches: list[dict[str, torch.Tensor]]) -> float:
            if len(micro_batches) != 1:
                raise ConfigError("zo2 runs one micro-batch per step; set train.grad_accum: 1")
            return float(opt.step(lambda: self.dual_losses(model, micro_batches[0])))

        return train_step

    def dual_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """L(θ+εz), L(θ−εz) from one pass of a doubled batch (dropout off, as in MeZO)."""
        labels = batch.get("labels", batch["input_ids"])
        rows = labels.shape[0]
        self._rows = rows
        doubled = {k: torch.cat([v, v]) for k, v in batch.items() if k != "labels"}
        was = model.training
        model.eval()
        try:
            logits = model(**doubled, use_cache=False).logits
        finally:
            model.train(was)
        self.optimizer_.forget_applied(self.units)
        vocab = logits.shape[-1]
        losses = [float(model.loss_function(logits=half, labels=labels, vocab_size=vocab).float())
                  for half in (logits[:rows], logits[rows:])]
        return losses[0], losses[1]

    def flush(self) -> None:
        """Apply every pending update to every unit (before evaluation outside the step, or a checkpoint)."""
        with torch.no_grad():
            for unit in self.units:
                self._upload(unit)
                self.optimizer_.catch_up(unit)
                self._writeback(unit)
        self.optimizer_.forget_applied(self.units)

    def materialize(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state (blocks read back from disk), after `flush`."""
        if self.optimizer_ is not None:
            self.flush()
        state = {}
        blocks = {id(u.module): u.index for u in self.units if u.index >= 0}
        for name, module in model.named_modules():
            if id(module) in blocks:
                for k, v in self.store.views[blocks[id(module)]].items():
                    state[f"{name}.{k}"] = torch.from_numpy(v.copy())
        for n, p in model.named_parameters():
            state.setdefault(n, p.detach().clone())
        return state

    # --- its memory story -----------------------------------------------------------------------------------
    def estimate(self, spec: RunSpec, base: MemoryBreakdown) -> MemoryBreakdown:
        """Parameters: what is not in a block, plus one resident block; no gradients or state. Activations: the
        doubled batch's ids and both streams' hidden states through one block's inference transients; at the
        head, both streams' fp32 logits plus one half's loss (its log-probabilities and the loss's fp32 working
        copy) — measured on Llama: exact at the head, which is the peak for vocabularies ≥ 8 × hidden."""
        blocks = [p for p in spec.model.params if _in_block(p.name)]
        per_block = sum(p.nbytes for p in blocks) // max(spec.model.n_layers, 1)
        params = sum(p.nbytes for p in spec.model.params) - sum(p.nbytes for p in blocks) + per_block
        m, t = spec.model, spec.tokens
        b = 4 if spec.compute_dtype == "fp32" else 2
        ids = 2 * t * 8
        layers = inference_activation_bytes(spec) + t * m.hidden * b
        head = 4 * t * m.vocab * 4 + 2 * t * m.hidden * b
        return base.with_(parameters=params, gradients=0, optimizer=0, temporaries=self.temporary_bytes(spec),
                          activations=ids + max(layers, head))


def _in_block(name: str) -> bool:
    """A parameter of a numbered transformer block (`…layers.3.…`)."""
    return block_of(name).rsplit(".", 1)[-1].isdigit()


def blocks_bytes(model: nn.Module) -> int:
    """Bytes of the decoder blocks' parameters (what ZO2 keeps on disk)."""
    return sum(p.numel() * p.element_size() for layer in decoder_layers(model) for p in layer.parameters())
