"""Where memfit meets the libraries it hooks into: installed versions, tested ranges, and one loud failure.

memfit edits third-party objects at run time (forward hooks on `transformers` attention modules, `peft` module
injection, torch's private `MemTracker`, saved-tensor hooks, ...). When such a hook finds nothing to act on, the
technique silently does nothing — the worst bug memfit can have. Every such place calls `require` (or `fail`)
after applying itself, so that a library update that moves an API raises a `CompatError` naming what memfit
expected and the versions installed next to the ones it was tested with (the ranges in pyproject.toml).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
from collections.abc import Iterable
from typing import Any, TypeVar

from memfit.errors import CompatError

LIBRARIES = ("torch", "transformers", "peft")
T = TypeVar("T")


def version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def tested_range(dist: str) -> str | None:
    """memfit's declared requirement for `dist` (e.g. 'transformers<5.40,>=5.0'), read from its metadata."""
    try:
        requires = importlib.metadata.requires("memfit") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for req in requires:
        if ";" in req:  # extras only
            continue
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", req)
        if match and match.group(1).lower().replace("_", "-") == dist.lower():
            return match.group(2).strip() or None
    return None


def describe(libraries: Iterable[str] = LIBRARIES) -> str:
    """'transformers 5.24.0 (tested >=5.0,<5.40), torch 2.13.0 (tested ...)' for the named libraries."""
    parts = []
    for dist in libraries:
        installed = version(dist) or "not installed"
        tested = tested_range(dist)
        parts.append(f"{dist} {installed}" + (f" (memfit is tested with {dist}{tested})" if tested else ""))
    return ", ".join(parts)


def fail(what: str, expected: str, libraries: Iterable[str] = ("transformers",)) -> CompatError:
    """The error to raise when a hook into a library found nothing to act on: what failed, what memfit expected."""
    return CompatError(f"{what}: memfit expected {expected}, under {describe(libraries)}; install a tested "
                       "version (memfit's constraints.txt pins them)")


def require(count: int, what: str, expected: str, libraries: Iterable[str] = ("transformers",)) -> int:
    """`count` (modules replaced, hooks fired, parameters frozen, ...) must be > 0; return it, else raise."""
    if count <= 0:
        raise fail(what, expected, libraries)
    return count


def find_instance(args: tuple, kwargs: dict[str, Any], cls: type[T]) -> T | None:
    """The first argument of a module call that is a `cls`, whatever its keyword: transformers renames arguments
    between releases (the KV cache is `past_key_values` up to 5.23 and `cache` from 5.24), so hooks match by type."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, cls):
            return value
    return None


def cache_keyword(model: Any) -> str:
    """The keyword under which a transformers model (its `forward` and `generate`) takes a KV cache: `cache` where
    the forward's signature names it (transformers 5.24 renamed it, deprecating `past_key_values`), else
    `past_key_values`. A pass-through wrapper (`forward(*args, **kwargs)`) is looked through via its `.model`."""
    seen = 0
    while model is not None and seen < 4:
        try:
            params = inspect.signature(type(model).forward).parameters
        except (TypeError, ValueError, AttributeError):
            params = {}
        if "cache" in params:
            return "cache"
        if "past_key_values" in params:
            return "past_key_values"
        model, seen = getattr(model, "model", None), seen + 1
    return "past_key_values"


# Messages optional libraries log while *being imported* (transformers pulls torchao in with any model class, peft
# pulls bitsandbytes): on a CPU machine each is expected and says nothing to a memfit user. Dropped one by one, by
# logger and text, so anything else these libraries log still reaches the user.
IMPORT_NOISE = {
    "torchao": ("Failed to load ",),  # its CUDA-only kernels (_C_mxfp8, _C_cutlass_90a) on CPU
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),  # torchao's enum registration
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),  # optional `kernels` package
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(p in message for p in self.prefixes)


def quiet_import_noise() -> None:
    """Install (once) the filters that drop `IMPORT_NOISE`; costs no import of the libraries themselves."""
    for name, prefixes in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


def count_training_calls(module: Any) -> None:
    """Count (once installed) the calls of `module` with grad enabled in training mode, whatever runs inside:
    a technique that overrides `module.forward` compares this with its own count to tell a bypassed override (a
    library change) from a module that simply ran without gradients (e.g. a frozen backbone under no_grad)."""
    import torch

    if getattr(module, "_memfit_training_calls", None) is not None:
        return
    module._memfit_training_calls = 0

    def count(mod: Any, args: Any) -> None:
        if torch.is_grad_enabled() and mod.training:
            mod._memfit_training_calls += 1

    module.register_forward_pre_hook(count)
