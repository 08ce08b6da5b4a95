"""The `runtime` category: what a training process holds besides its tensors.

`memfit.memory.estimate` predicts tensors; a process's peak (`VmHWM` on CPU) or a device's (nvidia-smi) adds:

- **CPU**: the interpreter and the libraries a run imports (torch, transformers, tokenizers, memfit's own
  modules: *measured once*, in a fresh interpreter that imports what `memfit train` imports, and cached per
  library versions in `$MEMFIT_CACHE/runtime.json`), plus what a run adds on top (`CPU_RUN_EXTRA`: kernels paged
  in by the first forward/backward, the data pipeline, the tokenizer) and the allocator's churn
  (`CPU_CHURN` × `transient_volume`: glibc keeps freed chunks of a step's transients in its arenas; techniques
  that allocate more per layer declare `Technique.allocator_churn`). Both constants are fitted on `memfit bench memory-model --only process` (fresh processes; docs/benchmarks.md, "Planner").
- **CUDA**: the context (driver, cuBLAS / cuDNN handles, torch's kernels, loaded lazily: `CUDA_CONTEXT`), the
  cuBLAS workspace (`CUBLAS_WORKSPACE`) and the caching allocator's reserve over what tensors allocate
  (`CUDA_RESERVE_FRACTION`) — documented constants with their sources below, to be refined by
  `memfit bench cuda` where a GPU is available. `max_memory_allocated` is the tensor peak,
  `max_memory_reserved` = tensor peak + reserve + workspace, the device's peak = that + the context.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from collections.abc import Sequence

from typing import Any

from memfit.memory.breakdown import MemoryBreakdown

RunSpec = Any  # memfit.memory.spec.RunSpec; not imported: spec -> arch -> measure -> runtime would be a cycle

MiB = 2**20

CPU_RUN_EXTRA = 43 * MiB
"""Bytes a training run adds to the libraries' RSS besides tensors and allocator churn: kernels and library pages
touched by the first step, the tokenized data, the tokenizer. Fitted on the process grid (docs/benchmarks.md)."""

CPU_CHURN = 3.6
"""Resident bytes glibc keeps from a step's transients, per byte of `transient_volume(spec)` (B·S·(H+I)·L·4:
one fp32 copy of every block's widest tensors). The fit on the process grid gave 3.58 for it and ~0 for a
fraction of the tensor peak: what the process keeps beyond its tensors grows with the tokens a step pushes
through the blocks, not with the weights or optimizer state (docs/benchmarks.md, "Planner")."""

CUDA_CONTEXT = 520 * MiB
"""The CUDA context with torch's kernels loaded lazily (`CUDA_MODULE_LOADING=LAZY`, the default since CUDA 11.7 /
torch 1.13): about 300–600 MiB depending on GPU, driver and libraries (PyTorch docs, "CUDA semantics → Memory
management": memory the allocator does not manage — the context — shows in nvidia-smi but not in
`memory_reserved`; NVIDIA CUDA C++ Programming Guide, "Lazy Loading"). 520 MiB is the middle of what torch 2.x
reports on A100/H100 (`torch.cuda.mem_get_info` before and after `torch.cuda.init()` + the first matmul); refine
it with `memfit bench cuda`."""

CUBLAS_WORKSPACE = 32 * MiB
"""cuBLAS workspace torch allocates per handle/stream through the caching allocator: 32 MiB on Hopper (sm90),
4096 KiB × 2 + 16 KiB × 8 elsewhere (`CUBLAS_WORKSPACE_CONFIG` default; torch `CublasHandlePool.cpp`,
`getChosenWorkspaceSize`). The larger is used: it only errs high."""

CUDA_BLOCK_ROUNDING = 512
"""The caching allocator rounds every request up to a multiple of 512 bytes (`kMinBlockSize`); requests of
1–10 MiB are carved from 20 MiB segments (`kLargeBuffer`), larger ones rounded to 2 MiB (`kRoundLarge`)
(c10/cuda/CUDACachingAllocator.cpp)."""

CUDA_RESERVE_FRACTION = 0.06
"""`max_memory_reserved` over `max_memory_allocated` for a training step: segments rounded up (above) and cached
blocks split by differently sized transients. Assumed 6 % (typical of torch ≥ 2.1 with expandable segments off);
measured by `memfit bench cuda`."""

_CACHE_NAME = "runtime.json"
OPTIONAL_LIBRARIES = ("peft",)
"""Packages only some techniques import; each one's RSS is measured on top of the base (`Technique.libraries`)."""

RUN_IMPORTS = ("memfit.cli", "memfit.train.build", "memfit.train.loop", "tokenizers")
"""What `memfit train` (and quickstart, bench children) has imported when its step peaks, besides the model: the
command line (typer, rich), the run loop, the tokenizer library. The probe also builds a tiny model through memfit's
own loader, so transformers' modeling stack loads as in a run (its import pulls torch.distributed.tensor, scipy,
torchao, accelerate: ~80 MiB). Libraries a run imports only after its peak (matplotlib for the report's plots) are
not counted. `tests/plan/test_runtime_imports.py` checks a real run imports nothing else before its peak."""

PROBE_IMPORTS = ("import importlib, json\n"
                 f"for name in {RUN_IMPORTS!r}:\n    importlib.import_module(name)\n"
                 "from memfit.models import build_llama\n"
                 "build_llama('llama-tiny', 256)\n")
"""The import set of a training run, as code (the probe runs it in a fresh interpreter)."""

_PROBE = (PROBE_IMPORTS +
          "from memfit.memory.process import current_rss\n"
          "out = {'base': current_rss()}\n"
          "for lib in {libs!r}:\n"
          "    before = current_rss()\n"
          "    try:\n        importlib.import_module(lib)\n    except ImportError:\n        continue\n"
          "    out[lib] = current_rss() - before\n"
          "print(json.dumps(out))")


@functools.cache
def _versions() -> str:
    """The library versions the measurement is cached under (read from package metadata: importing transformers
    to ask would cost seconds)."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str, missing: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # pragma: no cover - transformers is a dependency; memfit from source
            return missing

    probe = hashlib.sha256(_PROBE.encode()).hexdigest()[:8]  # a changed import set is measured afresh
    return (f"python {sys.version.split()[0]} torch {of('torch', 'none')} transformers {of('transformers', 'none')} "
            f"memfit {of('memfit', 'source')} probe {probe}")


def _cache_file() -> Path:
    from memfit.memory.cache import cache_dir

    return cache_dir() / _CACHE_NAME


_measured: dict[str, dict[str, int]] = {}


def library_rss() -> dict[str, int]:
    """{"base": RSS of a fresh interpreter once it imported what a training run imports, then each optional
    library: the RSS importing it adds} — measured once per library versions (a subprocess, a few seconds) and
    cached on disk."""
    key = _versions()
    if key in _measured:
        return _measured[key]
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached.get(key), dict):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        code = _PROBE.replace("{libs!r}", repr(OPTIONAL_LIBRARIES))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        lines = out.stdout.strip().splitlines()
        try:
            cached[key] = {k: int(v) for k, v in json.loads(lines[-1]).items()}
        except (IndexError, ValueError, AttributeError):
            raise RuntimeError(f"measuring the libraries' memory failed: {out.stderr.strip().splitlines()[-1:]}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # unwritable cache: measured again next time
    _measured[key] = cached[key]
    return cached[key]


def transient_volume(spec: RunSpec) -> int:
    """B·S·(H+I)·L·4 bytes: the scale of what a step allocates and frees in the blocks (CPU allocator churn)."""
    m = spec.model
    return spec.tokens * (m.hidden + m.intermediate) * m.n_layers * 4


def runtime_bytes(spec: RunSpec, tensor_peak: int, techniques: Sequence = ()) -> int:
    """Bytes the process (CPU: its RSS high-water mark) or the device (CUDA: what nvidia-smi shows) holds on top
    of a step whose tensors peak at `tensor_peak`. On CPU, `techniques` add the optional libraries they import
    (`Technique.libraries`, each one's RSS measured) and their declared `allocator_churn`."""
    if spec.extra.get("device", "cpu") == "cuda":
        return CUDA_CONTEXT + CUBLAS_WORKSPACE + int(CUDA_RESERVE_FRACTION * tensor_peak)
    measured = library_rss()
    libraries = {lib for t in techniques for lib in getattr(t, "libraries", ())}
    churn = CPU_CHURN + sum(getattr(t, "allocator_churn", 0.0) for t in techniques)
    return (measured["base"] + sum(measured.get(lib, 0) for lib in libraries) + CPU_RUN_EXTRA
            + int(churn * transient_volume(spec)))


def cuda_reserved(tensor_peak: int) -> int:
    """Predicted `torch.cuda.max_memory_reserved` of a step whose allocated peak is `tensor_peak`."""
    return tensor_peak + CUBLAS_WORKSPACE + int(CUDA_RESERVE_FRACTION * tensor_peak)


def cuda_needed(tensor_peak: int) -> int:
    """Device bytes a step needs so that no allocation fails: its tensors, the context and the cuBLAS workspace.
    The caching allocator's reserve above that (`CUDA_RESERVE_FRACTION`) is reclaimable: before raising an
    out-of-memory error it frees its cached unused blocks and retries (c10/cuda/CUDACachingAllocator.cpp, `malloc`:
    `release_available_cached_blocks`, then `release_cached_blocks`), so only fragmentation inside segments that
    hold live blocks is not; a run whose `cuda_needed` is at or just under the card can still fail on that."""
    return tensor_peak + CUDA_CONTEXT + CUBLAS_WORKSPACE


def with_runtime(breakdown: MemoryBreakdown, tensor_peak: int, spec: RunSpec,
                 techniques: Sequence = ()) -> tuple[MemoryBreakdown, int]:
    """(`breakdown` with its `runtime` category filled, predicted process / device peak)."""
    runtime = runtime_bytes(spec, tensor_peak, techniques)
    return breakdown.with_(runtime=runtime), tensor_peak + runtime
