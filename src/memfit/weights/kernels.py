"""Probing torch's CPU weight-only matmul kernels once per process (fail loudly, then fall back)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch


def kernel_works(cache: dict[str, bool], label: str, kernel: str, agrees: Callable[[], bool]) -> bool:
    """Whether `kernel` exists and `agrees()` with the decoded weight on a probe, remembered in `cache`; otherwise
    warn once, naming the torch version, so that the caller decodes the weights per forward instead."""
    if "ok" not in cache:
        try:
            ok = bool(agrees())
        except (AttributeError, RuntimeError, NotImplementedError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = "its result disagrees with the decoded weight"
        if not ok:
            logging.getLogger("memfit").warning(
                "%s weights: torch %s's matmul kernel (%s) is unusable (%s); decoding the weights per forward "
                "instead (slower)", label, torch.__version__, kernel, why)
        cache["ok"] = ok
    return cache["ok"]
