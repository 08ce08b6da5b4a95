"""The shared check of a weight kernel's fail-loudly fallback (`memfit.weights.kernels.kernel_works`)."""

from __future__ import annotations

import logging

import torch


def assert_falls_back_loudly(q, x, ref, caplog, kernel: str) -> None:
    """With the kernel patched broken and the probe cache cleared: two forwards decode (equal to `ref`) and one
    warning names `kernel` and torch's version."""
    with caplog.at_level(logging.WARNING, logger="memfit"), torch.no_grad():
        y = q(x)
        q(x)
    assert torch.equal(y, ref)
    warnings = [r.getMessage() for r in caplog.records if kernel in r.getMessage()]
    assert len(warnings) == 1 and torch.__version__ in warnings[0]
