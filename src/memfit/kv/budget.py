"""KV budgets in bytes: the most tokens per layer and head whose cache stays within a byte budget.

`--kv-budget 64MiB` is turned into a token budget by the policy's own estimate (`KVPolicy.kv_bytes`, which the
tests hold equal to the measured cache): the largest budget b whose cache, at its fullest over any generation length,
holds at most the given bytes. That counts everything the policy stores — scores and positions (H2O, Keyformer),
observation-window rows (SnapKV, PyramidKV), codes, scales and the full-precision residual (KIVI) — so the same
bytes buy more tokens with a quantized or statistics-free cache. (kvpress users ask for the same: kvpress #102,
#230.)
"""

from __future__ import annotations

import re
from collections.abc import Callable

from memfit.errors import ConfigError
from memfit.kv.base import KVPolicy
from memfit.memory.breakdown import format_bytes
from memfit.memory.spec import RunSpec

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)\s*", re.IGNORECASE)
MAX_TOKENS = 1 << 26


def parse_size(text: str) -> int | None:
    """Bytes of '64MiB', '1.5 GiB', '800KB' (binary units); None when `text` is not a size (it ends in B)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        return None
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def fullest_bytes(policy: KVPolicy, spec: RunSpec, budget: int) -> int:
    """The most bytes the cache holds over any generation length: every term saturates by `budget + 1` tokens
    except KIVI's residual, which cycles with a period of `residual` (≤ 128 tokens scanned)."""
    period = getattr(policy.config, "residual", 1)
    return max(policy.kv_bytes(spec, tokens=t) for t in range(budget, budget + period + 2))


def tokens_for_bytes(make: Callable[[int], KVPolicy], spec: RunSpec, nbytes: int, name: str) -> int:
    """The largest token budget b (per layer and head) with `fullest_bytes(make(b)) ≤ nbytes`."""

    def fits(b: int) -> bool | None:  # None: the policy refuses this budget (e.g. not above its window)
        try:
            policy = make(b)
        except ConfigError:
            return None
        return fullest_bytes(policy, spec, b) <= nbytes

    lo = 1
    while lo < MAX_TOKENS and fits(lo) is None:
        lo *= 2
    if not fits(lo):
        smallest = 1
        while fits(smallest) is None:
            smallest += 1
        raise ConfigError(f"--kv-budget {format_bytes(nbytes)} is below the smallest '{name}' cache for this model "
                          f"({format_bytes(fullest_bytes(make(smallest), spec, smallest))} at {smallest} tokens)")
    hi = lo * 2
    while hi < MAX_TOKENS and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
