"""Saving and loading quantized models as safetensors, and building transformers skeletons on the meta device.

A quantized checkpoint is a directory with `config.json` (transformers), `model.safetensors` (the packed tensors
at their real size) and `quantization.json` (format, group size, which modules are `QuantLinear`s). Loading
builds the architecture on the meta device, swaps in empty `QuantLinear`s and assigns the stored tensors, so the
dense weights are never materialised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memfit.errors import CheckpointError, ConfigError, ModelError
from memfit.weights.embedding import QuantEmbedding, shared_tensors
from memfit.weights.format import get_format
from memfit.weights.linear import QuantLinear, quantized_modules, set_submodule

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.device.type != "meta" else None
        if key is not None and key in seen:
            continue  # tied weight: stored once, re-tied on load
        if key is not None:
            seen[key] = name
        state[name] = t.detach().contiguous()
    return state


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` (dense, quantized, or mixed) to `directory` as safetensors + JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tied = shared_tensors(model)
    modules = {name: _entry(m, tied.get(name)) for name, m in quantized_modules(model).items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(_unique_state(model), str(tmp), metadata={"format": "pt", "memfit": "quantized"})
    os.replace(tmp, directory / WEIGHTS_FILE)
    config = getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(directory)
    tmpj = directory / (QUANT_FILE + ".tmp")
    tmpj.write_text(json.dumps({"modules": modules}, indent=1))
    os.replace(tmpj, directory / QUANT_FILE)
    return directory


def _entry(m: QuantLinear, tied_to: str | None) -> dict:
    entry = {"fmt": m.fmt, "group_size": m.group_size, "in_features": m.in_features,
             "out_features": m.out_features, "bias": m.bias is not None, "awq": m.in_scale is not None,
             "trainable_scale": m.scale_param() is not None and m.scale_param().requires_grad,
             "compute_dtype": str(m.compute_dtype).removeprefix("torch."), "layout": m.format.layout_version}
    entry["shapes"] = {name: list(t.shape) for name, t in m.tensors().items()}
    if isinstance(m, QuantEmbedding):
        entry.update(kind="embedding", padding_idx=m.padding_idx, embed_scale=m.embed_scale)
    if tied_to is not None:
        entry["tied_to"] = tied_to
    return entry


def _module(m: dict) -> QuantLinear:
    if m.get("kind") == "embedding":
        return QuantEmbedding(m["out_features"], m["in_features"], m["fmt"], m["group_size"], m["padding_idx"],
                              m["embed_scale"], device="meta", shapes=m.get("shapes"))
    return QuantLinear(m["in_features"], m["out_features"], m["fmt"], m["group_size"], bias=m["bias"],
                       in_scale=m["awq"], device="meta", shapes=m.get("shapes"))


def quantized_skeleton(model: nn.Module, modules: dict[str, dict]) -> None:
    """Swap in the empty (meta) quantized modules a checkpoint's `quantization.json` lists, in place."""
    for name, m in modules.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint module '{name}' does not exist in the model") from None
        q = _module(m)
        q.compute_dtype = getattr(torch, m.get("compute_dtype", "float32"))
        if m.get("trainable_scale"):
            q.make_scale_trainable()
        set_submodule(model, name, q)


def outdated_layout(modules: dict[str, dict]) -> str | None:
    """The first module whose stored byte order is older than its format's current one (written by an older
    memfit), or None."""
    from memfit.weights.format import get_format

    return next((n for n, m in modules.items() if m.get("layout", 1) < get_format(m["fmt"]).layout_version), None)


def own_and_tie(model: nn.Module, modules: dict[str, dict]) -> None:
    """After `load_state_dict(assign=True)`: quantized tensors become own, aligned copies (not views into the
    file's buffer: kernels need alignment) in the format's current layout, a quantized tied head shares its embedding's stored tensors, and
    dense tied weights are tied by transformers."""
    for name, m in modules.items():
        q = model.get_submodule(name)
        q.load_tensors(q.format.upgrade_layout(q.tensors(), q.out_features, m.get("layout", 1)))
    for name, m in modules.items():
        if "tied_to" in m:
            head, owner = model.get_submodule(name), model.get_submodule(m["tied_to"])
            for key in head.tensors():
                head._parameters[key] = owner._parameters[key]
    embeddings_quantized = any(m.get("kind") == "embedding" for m in modules.values())
    if hasattr(model, "tie_weights") and not embeddings_quantized:  # (transformers ties dense tensors only)
        model.tie_weights()


def meta_model(config) -> nn.Module:
    """The transformers model of `config` (its first `architectures` entry) built on the meta device."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        mapping = getattr(transformers.AutoModelForCausalLM, "_model_mapping", None)  # private: checked
        if mapping is None:
            from memfit.compat import fail

            raise fail(f"cannot find the model class of {type(config).__name__} (no `architectures` in its config)",
                       "transformers.AutoModelForCausalLM._model_mapping")
        cls = mapping[type(config)]
    with torch.device("meta"):
        model = cls(config)
    return model


def materialize_meta_buffers(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Rebuild modules whose non-persistent buffers (rotary `inv_freq`) are still on the meta device."""
    for name, mod in list(model.named_modules()):
        if not any(b.is_meta for b in mod.buffers(recurse=False)):
            continue
        if hasattr(mod, "rope_init_fn") or type(mod).__name__.endswith("RotaryEmbedding"):
            with torch.device(device):
                set_submodule(model, name, type(mod)(config=mod.config))
        else:
            raise ModelError(f"cannot rebuild buffer of '{name}' ({type(mod).__name__}) on {device}")


def _stack_prefix(modules: dict[str, dict], stack: int | None) -> dict[str, int]:
    """{stored tensor name: entries to read} for the stacked tensors of formats stored by importance."""
    if stack is None:
        return {}
    if stack < 1:
        raise ConfigError(f"stack must be ≥ 1 (blocks to load), got {stack}")
    keep = {}
    for name, m in modules.items():
        for key in get_format(m["fmt"]).stacked:
            keep[f"{name}.{key}"] = stack
            m.setdefault("shapes", {})
            if key in m["shapes"]:
                m["shapes"][key][0] = min(stack, m["shapes"][key][0])
    if not keep:
        raise ConfigError("stack= applies to formats stored as stacks of blocks (bitstack); this checkpoint has none")
    return keep


def _read(path: Path, prefix: dict[str, int]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors; of a stacked tensor only its first `prefix[name]` entries are read."""
    if not prefix:
        return load_file(str(path))
    from safetensors import safe_open

    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_slice(key)[: prefix[key]] if key in prefix else f.get_tensor(key)
    return state


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None, stack: int | None = None
                   ) -> nn.Module:
    """Load a checkpoint written by `save_quantized`. Without `model`, the architecture comes from config.json.
    `stack=k`: of a format stored as a stack of blocks (BitStack), read only the first k blocks of each layer —
    the size is chosen here, at load time."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).exists():
        raise CheckpointError(f"no {WEIGHTS_FILE} in {directory}; write one with memfit.weights.save_quantized")
    modules = json.loads((directory / QUANT_FILE).read_text())["modules"] if (directory / QUANT_FILE).exists() else {}
    prefix = _stack_prefix(modules, stack)
    if model is None:
        from transformers import AutoConfig

        model = meta_model(AutoConfig.from_pretrained(directory))
    quantized_skeleton(model, modules)
    state = _read(directory / WEIGHTS_FILE, prefix)
    _missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors the model lacks: {unexpected[:5]}")
    own_and_tie(model, modules)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"checkpoint lacks tensors for: {still_meta[:5]}")
    materialize_meta_buffers(model)
    return model
