"""What every structured-pruning method shares: the model's anatomy, calibration data and passes, cutting heads and
MLP channels out of a decoder layer, the config that describes the smaller model, and writing it as a plain
Hugging Face folder.

Which modules those are in each decoder family (fused projections, biases, norm conventions) is `layout.py`'s;
everything here goes through a `Layout`.

The pruned model must reload with `transformers.AutoModelForCausalLM.from_pretrained` alone, so every layer must keep
the shapes one config describes: the same number of heads, key/value heads, MLP channels and hidden size in
every layer. Methods that would choose a different width per layer (FLAP's adaptive structure, SliceGPT's per-layer
rotations) are restricted to uniform widths here; each method's docstring says how.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.errors import ConfigError, DataError, ModelError, RunDirError
from memfit.prune.layout import Layout, layout_of

MARKER = ".memfit-pruned"
"""File (JSON: method, sparsity, source, parameters) that marks a folder `memfit prune` wrote; only such a folder
is ever replaced."""


@dataclass
class PruneResult:
    """A pruned model (still a transformers model; its config rewritten to its new shapes when they are uniform)
    and what it cost."""

    model: nn.Module
    method: str
    sparsity: float
    params_before: int
    params_after: int
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> float:
        return self.params_after / self.params_before


# --- the model's anatomy ---------------------------------------------------------------------------------------

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (`layout.LAYOUTS`); `ModelError` for anything else."""
    return layout_of(model).layers(model)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def allowed_group_removals(hidden: int, n_kv: int, rep: int, layout: Layout) -> list[int]:
    """Head groups a layer may lose: none where the config cannot describe fewer heads (OPT, GPT-NeoX); else at
    least one group stays, and (transformers' `LlamaConfig`, which 5.x validates) the hidden size must be a multiple
    of the query heads left, (n_kv − removed) · rep."""
    if not layout.prune_heads:
        return [0]
    return [r for r in range(n_kv) if not layout.heads_divide_hidden or hidden % ((n_kv - r) * rep) == 0]


def allocate(target: float, wanted_groups: float, allowed: list[int], n_layers: int, head_params: int,
             channel_params: int, n_channels: int) -> tuple[int, int]:
    """(head groups, MLP channels) every layer loses: the `allowed` group count nearest `wanted_groups`, then MLP
    channels filling the rest of `target` (parameters to remove over all layers)."""
    groups = min(allowed, key=lambda r: (abs(r - wanted_groups), r))
    rest = target - n_layers * groups * head_params
    channels = min(n_channels - 1, max(0, round(rest / (n_layers * channel_params))))
    return groups, channels


def group_params(hidden: int, rep: int, head_dim: int) -> int:
    """Weights of one head group: q and o of its `rep` query heads, k and v of its key/value head."""
    return (2 * rep + 2) * head_dim * hidden


# --- cutting -------------------------------------------------------------------------------------------------

def sliced_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new `nn.Linear` holding only `rows` (output features) and `cols` (input features) of `lin`."""
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def _slice_linears(module: nn.Module, index: dict[str, tuple[int, torch.Tensor]]) -> None:
    for name, (dim, idx) in index.items():
        lin = getattr(module, name)
        setattr(module, name, sliced_linear(lin, rows=idx) if dim == 0 else sliced_linear(lin, cols=idx))


def keep_head_groups(attn: nn.Module, layout: Layout, keep: Iterable[int]) -> None:
    """Keep only the head groups `keep` (indices of key/value heads) of one attention module, in place."""
    n_kv = layout.heads(attn)[1]
    keep = sorted(set(int(g) for g in keep))
    if not keep or keep[-1] >= n_kv:
        raise ConfigError(f"cannot keep head groups {keep} of {n_kv}: at least one group must stay")
    _slice_linears(attn, layout.group_index(attn, keep))
    if hasattr(attn, "num_key_value_heads"):  # Phi-3 splits its fused qkv with it
        attn.num_key_value_heads = len(keep)


def keep_channels(mlp: nn.Module, layout: Layout, keep: Iterable[int]) -> None:
    """Keep only the MLP channels `keep` (gate/up rows, down_proj columns), in place."""
    idx = torch.tensor(sorted(set(int(c) for c in keep)), dtype=torch.long)
    if idx.numel() == 0:
        raise ConfigError("cannot prune every MLP channel of a layer: at least one must stay")
    _slice_linears(mlp, layout.channel_index(mlp, idx))


def add_output_bias(lin: nn.Linear, delta: torch.Tensor) -> nn.Linear:
    """`lin` with `delta` added to its bias (a zero bias created first when it has none)."""
    if lin.bias is None:
        new = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device,
                        dtype=lin.weight.dtype)
        new.weight.data.copy_(lin.weight.data)
        new.bias.data.zero_()
        lin = new
    lin.bias.data += delta.to(lin.bias.dtype)
    return lin


def sync_config(model: nn.Module) -> None:
    """Rewrite the config from the layers' shapes (heads, key/value heads, MLP width, hidden size, bias flags),
    refusing layers that differ from each other: a config describes one width for all layers.

    A bias flag (Llama's `attention_bias` / `mlp_bias`) switches biases on for every linear it governs, so a bias
    added to o_proj or down_proj (FLAP) gives the others of every layer a zero bias. A bias on a linear whose
    family never has one cannot be described and is refused."""
    config, layout = model.config, layout_of(model)
    layers = layout.layers(model)
    shapes = {(*layout.heads(layout.attn_of(l)), layout.channels(layout.mlp_of(l)),
               getattr(layout.attn_of(l), layout.o).out_features) for l in layers}
    if len(shapes) != 1:
        raise ModelError(f"pruned layers differ in shape ({sorted(shapes)}); a {config.model_type} config holds one "
                         f"width per model, so every layer must be pruned alike")
    heads, kv, hd, inter, hidden = shapes.pop()
    linears = [pair for l in layers for pair in layout.linears(l)]
    flags: dict[str, bool] = {}
    for module, n in linears:
        has, spec = getattr(module, n).bias is not None, layout.bias_of(n)
        if isinstance(spec, str):
            flags[spec] = flags.get(spec, False) or has
        elif has != spec:
            raise ModelError(f"{n} {'has' if has else 'lacks'} a bias, which a {config.model_type} model never "
                             f"{'has' if has else 'lacks'}; the config cannot describe it")
    for module, n in linears:
        spec = layout.bias_of(n)
        if isinstance(spec, str) and flags[spec] and getattr(module, n).bias is None:
            setattr(module, n, add_output_bias(getattr(module, n), torch.zeros(getattr(module, n).out_features)))
    if layout.prune_heads:
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, kv, hd
    setattr(config, layout.intermediate, inter)
    config.hidden_size = hidden
    for flag, on in flags.items():
        setattr(config, flag, on)


# --- calibration -------------------------------------------------------------------------------------------

DEFAULT_SAMPLES, DEFAULT_LENGTH = 32, 128


def calibration_ids(tokenizer, text: str, samples: int = DEFAULT_SAMPLES, length: int = DEFAULT_LENGTH) -> torch.Tensor:
    """`samples` windows of `length` token ids from the start of `text` (samples × length)."""
    if samples < 1 or length < 2:
        raise ConfigError(f"calibration needs ≥ 1 sample of ≥ 2 tokens, got {samples} × {length}")
    if tokenizer is None:
        raise DataError("calibration text needs the model's tokenizer, and the model folder has none; save the "
                        "tokenizer next to config.json")
    ids = tokenizer(text)["input_ids"]
    need = samples * length
    if len(ids) < need:
        if len(ids) < length:
            raise DataError(f"calibration text has {len(ids)} tokens, fewer than one window of {length}; give a "
                            f"longer --calib file or a smaller --calib-len")
        samples = len(ids) // length
        need = samples * length
    return torch.tensor(ids[:need], dtype=torch.long).reshape(samples, length)


def batches(ids: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    return list(ids.split(batch_size))


@torch.no_grad()
def calibrate(model: nn.Module, ids: torch.Tensor, hooks: dict[nn.Module, Callable], *, pre: bool = False,
              batch_size: int = 8) -> None:
    """Run the calibration windows through `model` with `hooks` ({module: fn(module, inputs[, output])}) attached
    as forward (or forward-pre) hooks; `CompatError` if a hook never fired (the forward no longer calls it)."""
    fired: dict[nn.Module, int] = {m: 0 for m in hooks}

    def counted(m, fn):
        def hook(*args):
            fired[m] += 1
            fn(*args)
        return hook

    handles = [(m.register_forward_pre_hook if pre else m.register_forward_hook)(counted(m, fn))
               for m, fn in hooks.items()]
    try:
        device = next(model.parameters()).device
        for batch in batches(ids, batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    silent = [type(m).__name__ for m, n in fired.items() if n == 0]
    if silent:
        from memfit.compat import fail

        raise fail(f"calibration hooks on {len(silent)} modules ({silent[0]}, ...) never ran",
                   "the model's forward to call every norm and projection it hooks")


class InputStats:
    """Per-feature mean and (unbiased) variance of a module's input over all calibration tokens, in float64."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, None, None

    def __call__(self, module, inputs, *_):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self.sumsq = torch.zeros(x.shape[1], dtype=torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0).cpu()
        self.sumsq += (x * x).sum(0).cpu()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def var(self) -> torch.Tensor:
        return ((self.sumsq - self.n * self.mean ** 2) / max(1, self.n - 1)).clamp_min(0)


# --- writing the folder --------------------------------------------------------------------------------------

def check_output(out: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output memfit must not write: a file, a non-empty folder memfit prune did not
    write, or (without `overwrite`) an earlier pruned model."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output {out} is a file, not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise RunDirError(f"output {out} is not empty and was not written by `memfit prune`; memfit writes only "
                              f"into new or empty folders: choose another -o")
        if not overwrite:
            raise RunDirError(f"{out} already holds a pruned model; pass --overwrite to replace it, or choose "
                              f"another -o")


def save_pruned(result: PruneResult, tokenizer, out: str | os.PathLike, *, source: str = "",
                overwrite: bool = False) -> Path:
    """Write the pruned model as a plain HF folder (config.json, model.safetensors, the tokenizer when there is one,
    and the `.memfit-pruned` marker) under a temporary name, then rename it into place: `out` is complete or
    untouched."""
    from memfit.rundir import writing

    out = Path(out)
    check_output(out, overwrite)
    sync_config(result.model)  # refuses layers of different widths, which no config can describe
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            result.model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            info = {"method": result.method, "sparsity": result.sparsity, "source": source,
                    "params_before": result.params_before, "params_after": result.params_after,
                    "details": result.details}
            (tmp / MARKER).write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
