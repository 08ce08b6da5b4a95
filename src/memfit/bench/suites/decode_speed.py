"""Decoding speed of memfit's weight formats against the reference packages' (issue 15 item 1; issue 16 item 7).

Part of `memfit bench speed` (techniques `int8_decode`, `int8_embed_decode` — memfit with the embedding and head
in int8 too; torchao quantizes the head, not the embedding —, `nf4_decode`, `int4_decode`, `int4_embed_decode`). One process, one model (the
speed suite's shape, random weights: speed does not depend on training), one prompt; every variant is its own
copy of the same fp32 model, quantized by its package: memfit's `apply_weights` (linears only, and with the
embedding and head too), torchao's `Int8WeightOnlyConfig` (`quantize_`), bitsandbytes' `Linear8bitLt` /
`Linear4bit(nf4)`, torchao's CPU int4 tensor (`Int4OpaqueTensor`), and the fp32 model itself. Rounds alternate the order (A B …, … B A); each round greedily
generates `new` tokens with every variant, and a row reports the median over rounds of the paired ratio
reference time / memfit time (≥ 1: memfit decodes at least as fast), its interquartile range, and the weight bytes
memfit / reference (tensor storages of parameters, buffers and bitsandbytes' quantization state).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from memfit.bench.harness import BenchOptions, record_partial

VOCAB = 8192  # the speed suite's vocabulary
PROMPT = 32


def _memfit(fmt: str, embeddings: bool = False) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        from memfit.weights import apply_weights

        return apply_weights(model, fmt, group_size=64 if fmt != "int8" else None, embeddings=embeddings)

    return build


def _torchao_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def _torchao_int4(dtype: torch.dtype) -> Callable[[nn.Module], nn.Module]:
    """torchao's CPU int4 weight-only tensor (`Int4OpaqueTensor`: the same `_weight_int4pack_mm_for_cpu` kernel),
    group 64, on every linear layer including the head; on the fp32 model as given, or cast to `dtype` first (bf16
    is how torchao runs int4 on CPU: its kernel's fp32-activation path is ~100x slower)."""

    def build(model: nn.Module) -> nn.Module:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        model = model.to(dtype)
        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=64))
        return model

    return build


def _bnb(kind: str) -> Callable[[nn.Module], nn.Module]:
    """Every linear layer memfit quantizes, replaced by bitsandbytes' module holding the same weights."""

    def build(model: nn.Module) -> nn.Module:
        import bitsandbytes as bnb

        from memfit.weights.linear import quantizable_linears, set_submodule

        for name, lin in quantizable_linears(model):
            if kind == "int8":
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          has_fp16_weights=False, threshold=0.0)
            else:
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                        quant_type="nf4", compute_dtype=torch.float32, compress_statistics=True)
            new.load_state_dict(lin.state_dict())
            set_submodule(model, name, new.to("cpu"))  # .to() quantizes
        return model

    return build


COMPARISONS: dict[str, tuple[Callable[[nn.Module], nn.Module], dict[str, Callable[[nn.Module], nn.Module]]]] = {
    "int8_decode": (_memfit("int8"), {"fp32 (transformers)": lambda m: m, "torchao int8 weight-only": _torchao_int8,
                                      "bitsandbytes Linear8bitLt": _bnb("int8")}),
    "int8_embed_decode": (_memfit("int8", embeddings=True), {
        "fp32 (transformers)": lambda m: m, "torchao int8 weight-only": _torchao_int8,
        "bitsandbytes Linear8bitLt": _bnb("int8")}),
    "nf4_decode": (_memfit("nf4"), {"fp32 (transformers)": lambda m: m, "bitsandbytes Linear4bit nf4": _bnb("nf4")}),
    "int4_decode": (_memfit("int4"), {"fp32 (transformers)": lambda m: m,
                                      "torchao int4 weight-only (bf16 model)": _torchao_int4(torch.bfloat16),
                                      "torchao int4 weight-only (fp32 model)": _torchao_int4(torch.float32)}),
    "int4_embed_decode": (_memfit("int4", embeddings=True), {
        "fp32 (transformers)": lambda m: m, "torchao int4 weight-only (bf16 model)": _torchao_int4(torch.bfloat16)}),
}


def weight_bytes(model: nn.Module) -> int:
    from memfit.memory.measure import storage_bytes

    tensors = [*model.parameters(), *model.buffers()]
    return storage_bytes(tensors, [getattr(p, "quant_state", None) for p in model.parameters()])


def _generate(model: nn.Module, ids: torch.Tensor, new: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def compare(technique: str, opts: BenchOptions, model: Callable[[bool], nn.Module]) -> list[dict]:
    mine_build, refs = COMPARISONS[technique]
    base = model(opts.quick).eval()
    variants: dict[str, nn.Module] = {"memfit": mine_build(copy.deepcopy(base))}
    rows: list[dict] = []
    for name, build in refs.items():
        try:
            variants[name] = build(copy.deepcopy(base))
        except ImportError as exc:
            rows.append({"technique": technique, "reference": name, "error": f"not installed: {exc.name}"})
    rounds, new = (3, 8) if opts.quick else (9, 32)
    ids = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    order = list(variants)
    for name in order:  # warm-up: lazy kernels, the int8 kernel's probe, allocator
        _generate(variants[name], ids, 2)
    times: dict[str, list[float]] = {name: [] for name in order}
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(_generate(variants[name], ids, new))
    mine_bytes = weight_bytes(variants["memfit"])
    for name in order[1:]:
        ratios = [r / m for m, r in zip(times["memfit"], times[name])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append({"technique": technique, "reference": name,
                     "memfit_tokens_per_s": round(new / statistics.median(times["memfit"]), 1),
                     "ref_tokens_per_s": round(new / statistics.median(times[name]), 1),
                     "speed": round(statistics.median(ratios), 3), "speed_iqr": f"{q[0]:.2f}-{q[2]:.2f}",
                     "weight_bytes": round(mine_bytes / weight_bytes(variants[name]), 3),
                     "memfit_weight_mib": round(mine_bytes / 2**20, 2),
                     "ref_weight_mib": round(weight_bytes(variants[name]) / 2**20, 2)})
    return rows


def run(opts: BenchOptions, model: Callable[[bool], nn.Module]) -> list[dict]:
    """The decode rows on `model(quick)` (the speed suite's model, random weights)."""
    rows = []
    for technique in COMPARISONS:
        if not opts.wants(technique):
            continue
        t0 = time.perf_counter()
        for row in compare(technique, opts, model):
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            record_partial(opts, {"workload": "speed", "method": f"{technique} vs {row['reference']}", **row})
            rows.append(row)
    return rows
