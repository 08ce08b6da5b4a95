"""DFloat11: lossless bf16 weights at about 70 % of their size (entropy-coded exponents).

Zhang, Sui, Zhong, Chaudhary, Ji, Hu & Ding 2025, "70% Size, 100% Accuracy: Lossless LLM Compression for Efficient
GPU Inference via Dynamic-Length Float". The 8 exponent bits of trained bf16 weights carry about 2.6–3 bits of
information, so they are Huffman-coded while sign and mantissa (8 bits) stay raw: ≈ 11 of 16 bits per weight, and
decoding gives back the bf16 weight bit for bit, so outputs are identical to the bf16 model's (tested).

Stored per (out, in) weight:
- `sign_mantissa` (out, in) uint8: sign bit, then the 7 mantissa bits;
- `exponents` uint8: the Huffman bit stream (canonical codes, at most 16 bits long — the paper's hierarchical
  lookup tables serve the same purpose: one table lookup per code);
- `block_offsets` (ceil(out·in / 256),) int32: the bit where each block of 256 codes starts, so all blocks decode
  in parallel (the paper's per-thread "gaps" and output positions);
- `code_lengths` (256,) uint8: each exponent's code length (0: unused), from which the canonical codes and the
  decoding table are rebuilt.

memfit decodes per forward with vectorized torch ops on the CPU (all blocks in parallel, 256 steps of a 16-bit
table lookup) instead of the paper's CUDA kernel: lossless and small, but decoding costs time on every forward
(see docs/benchmarks.md). An embedding lookup decodes only the blocks holding the rows it reads. The size depends
on the weights' values: the layout and the estimate predict `EXPECTED_EXPONENT_BITS` per weight, and the measured
size is reported next to it. Weights that are not bf16 are rounded to bf16 first (lossless with respect to bf16).
"""

from __future__ import annotations

import heapq
import math

import torch

from memfit.errors import ConfigError
from memfit.weights.base import WeightQuantTechnique
from memfit.weights.format import StorageLayout, WeightFormat, register

BLOCK = 256
"""Codes per independently decodable block (4 bytes of offset per 256 weights: 0.125 bits per weight)."""
MAX_CODE = 16
"""Longest Huffman code: a decoding table of 2¹⁶ entries."""
EXPECTED_EXPONENT_BITS = 3.0
"""Predicted bits per exponent (trained LLM weights: 2.6–3 in the paper; Gaussian init: about 2.7)."""


def code_lengths(counts: torch.Tensor, max_len: int = MAX_CODE) -> torch.Tensor:
    """Huffman code lengths (256,) for symbol `counts`, limited to `max_len` bits by halving the counts (used
    symbols stay used) until the tree is shallow enough."""
    counts = [int(c) for c in counts.tolist()]
    while True:
        lengths = _huffman(counts)
        if max(lengths) <= max_len:
            return torch.tensor(lengths, dtype=torch.uint8)
        counts = [(c + 1) // 2 for c in counts]


def _huffman(counts: list[int]) -> list[int]:
    used = [s for s, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    heap = [(counts[s], s, [s]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, i1, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, i1, s1 + s2))
    return lengths


def canonical_codes(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(symbols sorted by (length, symbol), their canonical codes) for used symbols."""
    lengths = lengths.long()
    symbols = [s for s in sorted(range(256), key=lambda s: (lengths[s].item(), s)) if lengths[s] > 0]
    codes, code, prev = [], 0, int(lengths[symbols[0]])
    for s in symbols:
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes.append(code)
        code += 1
    return torch.tensor(symbols), torch.tensor(codes)


_TABLES: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}


def decoding_table(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(symbol, code length) for every 16-bit window: canonical codes left-aligned are increasing, so the code a
    window starts with is the last one whose left-aligned value is ≤ the window. Cached per code book."""
    key = lengths.numpy().tobytes()
    if key not in _TABLES:
        symbols, codes = canonical_codes(lengths)
        lens = lengths.long()[symbols]
        starts = codes << (MAX_CODE - lens)
        index = torch.searchsorted(starts, torch.arange(2**MAX_CODE), right=True) - 1
        _TABLES[key] = (symbols[index].to(torch.uint8), lens[index])
    return _TABLES[key]


class DFloat11Format(WeightFormat):
    name = "dfloat11"
    variable_size = True
    untrainable_scale = "DFloat11 is lossless bf16: it has no scale to train"

    def layout(self, out: int, inp: int, group_size: int | None) -> StorageLayout:
        n = out * inp
        stream = math.ceil(n * EXPECTED_EXPONENT_BITS / 8) + 4
        return StorageLayout(inp, inp, {"sign_mantissa": ((out, inp), torch.uint8), "exponents": ((stream,), torch.uint8),
                                        "block_offsets": ((math.ceil(n / BLOCK),), torch.int32),
                                        "code_lengths": ((256,), torch.uint8)})

    def encode(self, w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        bits = w.detach().to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
        exps = (bits >> 7) & 0xFF
        sign_mantissa = ((bits >> 8) & 0x80) | (bits & 0x7F)
        flat = exps.flatten()
        lengths = code_lengths(torch.bincount(flat, minlength=256))
        symbols, codes = canonical_codes(lengths)
        code_of = torch.zeros(256, dtype=torch.long)
        code_of[symbols] = codes
        n = flat.numel()
        pad = (-n) % BLOCK  # pad with the shortest code so that every block holds BLOCK codes
        flat = torch.cat([flat, flat.new_full((pad,), int(symbols[0]))])
        lens = lengths.long()[flat]
        code = code_of[flat]
        pos = torch.cumsum(lens, 0) - lens
        total = int(pos[-1] + lens[-1])
        if total >= 2**31:
            raise ConfigError(f"dfloat11: a {tuple(w.shape)} weight needs {total} bits, more than int32 offsets "
                              "address; split the layer")
        stream = torch.zeros(math.ceil(total / 8) * 8 + 32, dtype=torch.uint8)
        for j in range(int(lens.max())):
            has = lens > j
            stream[pos[has] + j] = ((code[has] >> (lens[has] - 1 - j)) & 1).to(torch.uint8)
        packed = (stream.view(-1, 8).long() << torch.arange(7, -1, -1)).sum(1).to(torch.uint8)
        return {"sign_mantissa": sign_mantissa.to(torch.uint8), "exponents": packed,
                "block_offsets": pos[::BLOCK].to(torch.int32), "code_lengths": lengths}

    def decode_blocks(self, t: dict[str, torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
        """The exponents of blocks `blocks`, (len(blocks), BLOCK) uint8, all blocks one step at a time."""
        symbol, length = decoding_table(t["code_lengths"])
        stream = t["exponents"].long()
        pos = t["block_offsets"].long()[blocks]
        out = torch.empty(blocks.numel(), BLOCK, dtype=torch.uint8)
        for step in range(BLOCK):
            byte = pos >> 3
            window = (stream[byte] << 16) | (stream[byte + 1] << 8) | stream[byte + 2]
            window = (window >> (8 - (pos & 7))) & 0xFFFF
            out[:, step] = symbol[window]
            pos = pos + length[window]
        return out

    @staticmethod
    def _bf16(sign_mantissa: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
        sm = sign_mantissa.int()
        bits = ((sm & 0x80) << 8) | (exps.int() << 7) | (sm & 0x7F)
        return torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16).view(torch.bfloat16).float()

    def decode(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        blocks = torch.arange(t["block_offsets"].numel())
        exps = self.decode_blocks(t, blocks).flatten()[: out * inp].view(out, inp)
        return self._bf16(t["sign_mantissa"], exps)

    def decode_rows(self, t: dict[str, torch.Tensor], rows: torch.Tensor, out: int, inp: int) -> torch.Tensor:
        first = rows * inp // BLOCK
        span = (inp + BLOCK - 1) // BLOCK + 1  # blocks a row can touch
        blocks = (first[:, None] + torch.arange(span)).clamp_max(t["block_offsets"].numel() - 1)
        exps = self.decode_blocks(t, blocks.flatten()).view(rows.numel(), span * BLOCK)
        start = (rows * inp - first * BLOCK)[:, None] + torch.arange(inp)
        return self._bf16(t["sign_mantissa"].index_select(0, rows), exps.gather(1, start))

    def error_bound(self, t: dict[str, torch.Tensor], out: int, inp: int) -> torch.Tensor:
        """Rounding to bf16 (8 significant bits) moves a weight by at most 2⁻⁹ of its magnitude; relative to the
        decoded value 2⁻⁸ is safe. Nothing is lost with respect to bf16 itself."""
        return self.decode(t, out, inp).abs() * 2**-8 + 1e-38


DFLOAT11 = register(DFloat11Format())


class DFloat11Weights(WeightQuantTechnique):
    name = "dfloat11"
    format = DFLOAT11
