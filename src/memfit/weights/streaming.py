"""Weight streaming — Alizadeh et al. 2024, "LLM in a flash: Efficient Large Language Model Inference with
Limited Memory" (Apple).

The decoder layers stay on disk (safetensors) and are read just before they run, with a prefetch window so that
reading layer i+1 overlaps computing layer i, and released right after; embeddings, final norm and head stay
resident. Peak weight memory is `static + window × largest layer` instead of the whole model, so a model whose
weights exceed the budget still generates — token for token the same as in memory. (The paper's further tricks,
sparsity prediction to load only active FFN neurons and row-column bundling, are not reproduced.)

Reads use `pread` into fresh tensors rather than an mmap: pages of a mapped file count toward the process's RSS
while they stay mapped, which would hide the saving; plain reads leave only the live layers resident. Works for
dense transformers checkpoints (`save_pretrained`) and for memfit's quantized ones (`save_quantized`).

>>> sm = StreamedModel.from_pretrained("ckpt/", window=2)
>>> out = sm.generate(input_ids, max_new_tokens=32)
>>> sm.peak_resident_bytes
"""

from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.errors import BudgetError, CheckpointError, ConfigError
from memfit.weights.io import (
    QUANT_FILE,
    materialize_meta_buffers,
    meta_model,
    outdated_layout,
    own_and_tie,
    quantized_skeleton,
)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """Reads single tensors of one or more safetensors files with `pread` (no mmap, no whole-file load)."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"no model.safetensors (or index) in {directory}; save the model with "
                                  "save_pretrained(safe_serialization=True) or memfit.weights.save_quantized")
        self.entries: dict[str, tuple[int, int, torch.dtype, tuple[int, ...], int]] = {}
        self._fds: list[int] = []
        self.reads = 0  # pread calls that completed a tensor or a layer
        for name in files:
            fd = os.open(directory / name, os.O_RDONLY)
            self._fds.append(fd)
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, n, 8))
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                start, end = meta["data_offsets"]
                self.entries[key] = (len(self._fds) - 1, 8 + n + start, _DTYPES[meta["dtype"]],
                                     tuple(meta["shape"]), end - start)

    def nbytes(self, key: str) -> int:
        return self.entries[key][4]

    def get(self, key: str) -> torch.Tensor:
        return self.read_into(key, torch.empty(self.nbytes(key), dtype=torch.uint8))

    def read_into(self, key: str, buf: torch.Tensor) -> torch.Tensor:
        """Fill a uint8 buffer of `nbytes(key)` with the tensor's bytes; return it viewed as the tensor."""
        fd, offset, dtype, shape, nbytes = self.entries[key]
        self._pread(fd, offset, buf, nbytes, key)
        return buf.view(dtype).reshape(shape)

    def span(self, keys: list[str]) -> tuple[int, int, int] | None:
        """(file, start, end) when `keys` fill one contiguous byte range of one file (a layer saved by
        transformers or memfit: its tensors are adjacent), else None."""
        entries = [self.entries[k] for k in keys]
        if len({e[0] for e in entries}) != 1:
            return None
        start = min(e[1] for e in entries)
        end = max(e[1] + e[4] for e in entries)
        return (entries[0][0], start, end) if end - start == sum(e[4] for e in entries) else None

    def read_span(self, keys: list[str], buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of `keys` (a `span`) with one large read into `buf` (uint8, the span's size), as views;
        a tensor whose offset does not suit its dtype is copied out."""
        fd, start, end = self.span(keys)
        self._pread(fd, start, buf, end - start, ",".join(keys[:2]))
        out = {}
        for k in keys:
            _, offset, dtype, shape, nbytes = self.entries[k]
            part = buf[offset - start: offset - start + nbytes]
            if (offset - start) % dtype.itemsize:
                part = part.clone()
            out[k] = part.view(dtype).reshape(shape)
        return out

    def _pread(self, fd: int, offset: int, buf: torch.Tensor, nbytes: int, what: str) -> None:
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            chunk = os.preadv(self._fds[fd], [view[done:]], offset + done)
            if chunk <= 0:
                raise CheckpointError(f"checkpoint truncated while reading '{what}'")
            done += chunk
        self.reads += 1

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the `nn.ModuleList` holding the most parameters."""
    best: tuple[str, nn.ModuleList] | None = None
    best_n = -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of layers to stream")
    return best


def _release(module: nn.Module) -> None:
    """Drop a layer's tensors, keeping meta placeholders with the same shapes."""
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and not p.is_meta:
                m._parameters[k] = nn.Parameter(p.to("meta"), requires_grad=False)
        for k, b in m._buffers.items():
            if b is not None and not b.is_meta and k not in m._non_persistent_buffers_set:
                m._buffers[k] = b.to("meta")


def return_freed_memory_to_os(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold so freed layers go back to the OS (Linux/glibc only; process-wide).

    glibc raises the threshold to the size of any mmapped block that is freed (up to 32 MiB), after which
    layer-sized tensors come from the heap, where interleaved lifetimes (layer i freed while i+1 is live) keep the
    pages resident: measured on llama-20m, window 2, a process peak of 70 MiB with the default vs 42 MiB fixed
    (37.5 MiB of weights resident). Returns False where mallopt is unavailable.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD; also disables the dynamic adjustment
    except (OSError, AttributeError):
        return False


class StreamedModel(nn.Module):
    """A transformers model whose decoder layers are streamed from a safetensors checkpoint during forward."""

    def __init__(self, model: nn.Module, reader: SafetensorsReader, window: int = 2, resident: int = 0) -> None:
        super().__init__()
        if window < 1:
            raise ConfigError(f"streaming window must be ≥ 1 layer, got {window}")
        self.model = model
        self.reader = reader
        self.layers_name, self.layers = find_layers(model)
        self.n_layers = len(self.layers)
        if not 0 <= resident <= self.n_layers:
            raise ConfigError(f"resident layers must be in [0, {self.n_layers}], got {resident}")
        self.resident_layers = resident  # layers 0 … resident-1 stay loaded once read
        self.streamed = list(range(resident, self.n_layers))
        self.window = min(window, len(self.streamed)) if self.streamed else 0
        self.layer_keys = [
            [f"{self.layers_name}.{i}.{k}" for k in layer.state_dict()] for i, layer in enumerate(self.layers)
        ]
        missing = [k for keys in self.layer_keys for k in keys if k not in reader.entries]
        if missing:
            raise CheckpointError(f"checkpoint lacks layer tensors: {missing[:3]}")
        self.layer_bytes = [sum(reader.nbytes(k) for k in keys) for keys in self.layer_keys]
        self.static_bytes = sum(t.numel() * t.element_size() for t in _unique_tensors(model) if not t.is_meta)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memfit-prefetch")
        self._pending: dict[int, Future] = {}
        self._loaded: set[int] = set()
        self._lock = threading.Lock()
        self.resident_bytes = self.static_bytes
        self.peak_resident_bytes = self.static_bytes
        self.bytes_read = 0
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._make_pre_hook(i))
            layer.register_forward_hook(self._make_post_hook(i))

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, window: int = 2, budget_bytes: int | None = None,
                        attn_implementation: str | None = None, release_to_os: bool = True,
                        resident: int | None = None) -> StreamedModel:
        """Build the model on the meta device, load only the non-layer weights, stream the layers on demand.

        `budget_bytes`: keep as many layers resident (read once, never released) as fit next to the non-layer
        weights and `window` streamed layers (`resident=None`), and refuse (BudgetError) when even none fit.
        `resident`: that many first layers resident, whatever the budget (default without a budget: none).
        `release_to_os`: see `return_freed_memory_to_os` (without it glibc may keep freed layers resident).
        """
        from transformers import AutoConfig

        if release_to_os:
            return_freed_memory_to_os()

        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise CheckpointError(f"no config.json in {directory}: not a transformers checkpoint directory")
        config = AutoConfig.from_pretrained(directory)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = meta_model(config)
        qfile = directory / QUANT_FILE
        modules = json.loads(qfile.read_text())["modules"] if qfile.exists() else {}
        stale = outdated_layout(modules)
        if stale is not None:
            raise CheckpointError(f"{directory} stores '{stale}' in an older memfit byte order that streaming cannot "
                                  "read in place; load_quantized it once and save_quantized it again")
        quantized_skeleton(model, modules)
        reader = SafetensorsReader(directory)
        layers_name, _ = find_layers(model)
        static = {k: reader.get(k) for k in reader.entries if not k.startswith(layers_name + ".")}
        model.load_state_dict(static, strict=False, assign=True)
        own_and_tie(model, {n: m for n, m in modules.items() if not n.startswith(layers_name + ".")})
        materialize_meta_buffers(model)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        streamed = cls(model, reader, window, resident or 0)
        if resident is None and budget_bytes is not None:
            streamed.set_resident(streamed.most_resident(budget_bytes))
        still_meta = [n for n, p in model.named_parameters()
                      if p.is_meta and not n.startswith(layers_name + ".")]
        if still_meta:
            raise CheckpointError(f"checkpoint lacks tensors for: {still_meta[:3]}")
        need = streamed.planned_peak_bytes
        if budget_bytes is not None and need > budget_bytes:
            streamed.close()
            raise BudgetError(
                f"streaming needs {need} bytes of weights (resident {streamed.static_bytes} + {streamed.window} "
                f"layers × {max(streamed.layer_bytes)}); budget is {budget_bytes}: lower the window or quantize")
        return streamed

    def planned_peak_for(self, resident: int) -> int:
        """Non-layer weights + the first `resident` layers + `window` of the largest streamed layers."""
        streamed = sorted(self.layer_bytes[resident:], reverse=True)
        window = min(max(self.window, 1), len(streamed))
        return self.static_bytes + sum(self.layer_bytes[:resident]) + sum(streamed[:window])

    @property
    def planned_peak_bytes(self) -> int:
        """The most this model ever holds (see `planned_peak_for`)."""
        return self.planned_peak_for(self.resident_layers)

    def most_resident(self, budget_bytes: int) -> int:
        """The most first layers that can stay resident with the streamed window still under the budget."""
        fits = [k for k in range(self.n_layers + 1) if self.planned_peak_for(k) <= budget_bytes]
        return max(fits) if fits else 0

    def set_resident(self, resident: int) -> None:
        """Keep layers 0 … resident-1 loaded once read (before the first forward)."""
        window = self.window or 1
        self.resident_layers = resident
        self.streamed = list(range(resident, self.n_layers))
        self.window = min(window, len(self.streamed)) if self.streamed else 0

    @property
    def total_weight_bytes(self) -> int:
        return self.static_bytes + sum(self.layer_bytes)

    # --- streaming ---------------------------------------------------------------------------------------------
    def _read_layer(self, i: int, buffers: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
        prefix = f"{self.layers_name}.{i}."
        if isinstance(buffers, torch.Tensor):  # the layer is one contiguous range: one large read
            tensors = self.reader.read_span(self.layer_keys[i], buffers)
            return {k[len(prefix):]: t for k, t in tensors.items()}
        return {k[len(prefix):]: self.reader.read_into(k, buffers[k]) for k in self.layer_keys[i]}

    def _prefetch(self, i: int) -> None:
        if i in self._loaded or i in self._pending:
            return
        self._account(self.layer_bytes[i])
        # allocate on the calling thread (one malloc arena for all layer buffers); the thread only does the reads
        keys = self.layer_keys[i]
        buffers: dict[str, torch.Tensor] | torch.Tensor
        if self.reader.span(keys) is not None:
            buffers = torch.empty(self.layer_bytes[i], dtype=torch.uint8)
        else:
            buffers = {k: torch.empty(self.reader.nbytes(k), dtype=torch.uint8) for k in keys}
        self._pending[i] = self._pool.submit(self._read_layer, i, buffers)

    def _next_streamed(self, i: int, count: int) -> list[int]:
        """The `count` streamed layers that run after layer `i` (cyclically: the next token starts over)."""
        if not self.streamed or count <= 0:
            return []
        after = [j for j in self.streamed if j > i] + self.streamed
        return after[:count]

    def _account(self, nbytes: int) -> None:
        self.resident_bytes += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        if nbytes > 0:
            self.bytes_read += nbytes

    def _ensure(self, i: int) -> None:
        if i in self._loaded:
            return
        self._prefetch(i)
        state = self._pending.pop(i).result()
        self.layers[i].load_state_dict(state, strict=True, assign=True)
        self._loaded.add(i)

    def _make_pre_hook(self, i: int):
        def hook(module: nn.Module, args: Any) -> None:
            self._ensure(i)
            # read ahead while this layer computes: the next window-1 streamed layers (a resident layer
            # computing lets the first streamed one after it start reading)
            ahead = self.window - 1 if i >= self.resident_layers else self.window
            for j in self._next_streamed(i, ahead):
                self._prefetch(j)

        return hook

    def _make_post_hook(self, i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if i >= self.resident_layers and self.window < len(self.streamed):
                _release(self.layers[i])
                self._loaded.discard(i)
                self.resident_bytes -= self.layer_bytes[i]

        return hook

    # --- use ---------------------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """Anything else (config, generation_config, set_attn_implementation, ...) is the wrapped model's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def register_forward_hook(self, *args: Any, **kwargs: Any):
        """Hooks go on the wrapped model: `generate` calls its forward, not this wrapper's."""
        return self.model.register_forward_hook(*args, **kwargs)

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any):
        return self.model.register_forward_pre_hook(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def reset_peak(self) -> None:
        self.peak_resident_bytes = self.resident_bytes
        self.bytes_read = 0

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pool.shutdown(wait=True)
        self.reader.close()


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
