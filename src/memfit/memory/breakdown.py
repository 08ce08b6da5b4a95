"""Bytes by the place memory is spent: the common currency of estimates and measurements."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

TENSOR_CATEGORIES = (
    "parameters",
    "buffers",
    "gradients",
    "optimizer",
    "activations",
    "temporaries",
    "kv_cache",
    "other",
)
CATEGORIES = (*TENSOR_CATEGORIES, "runtime")
"""`runtime` is what the process holds besides tensors (interpreter, libraries, allocator slack; on CUDA the
context and the caching allocator's reserve): `memfit.memory.runtime`. Estimates of tensors leave it 0."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per category. Estimates return one; measurements report one at the peak."""

    parameters: int = 0
    buffers: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    kv_cache: int = 0
    other: int = 0
    runtime: int = 0

    @property
    def total(self) -> int:
        """Tensor bytes: the sum of every category but `runtime`."""
        return sum(getattr(self, c) for c in TENSOR_CATEGORIES)

    @property
    def process_total(self) -> int:
        """Tensors plus the runtime: what the process (or the device) holds."""
        return self.total + self.runtime

    def __add__(self, other: MemoryBreakdown) -> MemoryBreakdown:
        return MemoryBreakdown(**{c: getattr(self, c) + getattr(other, c) for c in CATEGORIES})

    def with_(self, **changes: int) -> MemoryBreakdown:
        """A copy with some categories replaced (how a technique states its own category)."""
        return replace(self, **{k: int(v) for k, v in changes.items()})

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> MemoryBreakdown:
        return cls(**{c: int(data.get(c, 0)) for c in CATEGORIES})


def format_bytes(n: float) -> str:
    """Human-readable size in binary units (B, KiB, MiB, GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
