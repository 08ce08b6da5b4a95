"""`memfit bench speed`: every training technique that has a reference implementation, side by side with it
(issue 15).

One process, one model shape, the same batches: memfit's technique — built through the registry, as a recipe
builds it — and each reference package, each on its own copy of the same initial model. Rounds alternate the
order (memfit first in even rounds, last in odd ones: A B, B A, A B, ...); each round times one train step of every
variant (`steps`), and a row reports the median over rounds of the paired ratio reference time / memfit time
(≥ 1: memfit is at least as fast) with its interquartile range, for the whole step and, where the optimizer step
is separate, for that step alone (forward and backward are the same code on both sides, so that is where optimizer
implementations differ). Pairs of adjacent runs see the same load from other processes on a shared machine.

Bytes (memfit / reference, ≤ 1: memfit is no larger), from two more steps after the timing: optimizer state (tensor
storages the optimizer holds — in `optimizer.state`, on helper objects there, or in the reference's own
attributes; tensor subclasses flattened), the optimizer step's temporaries (peak CPU allocation growth during
`step()`) and the tensor peak of a whole train step (bytes live at its start plus its peak growth). Growth is read
from the profiler's allocator events, which also see torchao's compiled step (a `TorchDispatchMode` such as
`MemoryMeter` cannot run around compiled code).

Projector refreshes (GaLore's SVD) are excluded: the gap is longer than the run, so both sides refresh once, in the
warm-up step (`memfit bench optim` times refreshes).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memfit.bench.harness import BenchOptions, record_partial
from memfit.bench.workloads import SPEED_MODEL, SPEED_PRESET, SPEED_QUICK_MODEL

VOCAB = 8192
LR = 1e-3
RANK = 64
NO_REFRESH = 10_000  # projector gap longer than any run: only the warm-up step refreshes


@dataclass
class Variant:
    """One implementation, trained on its own model: `forward_backward(ids)` (updates too, when fused into backward)
    then `step()` (optimizer step and zero_grad; closes the step when fused)."""

    name: str
    model: nn.Module
    forward_backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    optimizer: Any = None
    state_tensors: Callable[[], list[torch.Tensor]] = list  # optimizer state held outside `optimizer.state`
    fused: bool = False  # updates run inside backward: no separate optimizer step to time
    fb_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)

    def run(self, ids: torch.Tensor) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.forward_backward(ids)
        t1 = time.perf_counter()
        self.step()
        return t1 - t0, time.perf_counter() - t1


def _model(quick: bool) -> nn.Module:
    from memfit.models import build_llama

    return build_llama(SPEED_PRESET, VOCAB, seed=0, **(SPEED_QUICK_MODEL if quick else SPEED_MODEL))


def _loss_backward(model: nn.Module) -> Callable[[torch.Tensor], None]:
    def fb(ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    return fb


def _plain(name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Variant:
    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Variant(name, model, _loss_backward(model), step, optimizer)


def _memfit(options: dict, adapter: dict | None = None, quick: bool = False) -> Callable[[], Variant]:
    """memfit's technique(s) built as the run loop builds them (registry → apply → optimizer → forward-backward)."""

    def build() -> Variant:
        from memfit.memory.spec import RunSpec
        from memfit.optim.layerwise import LayerwiseOptimizer
        from memfit.techniques.base import Context
        from memfit.techniques.registry import build_technique
        from memfit.train.build import apply_techniques, build_optimizer, wrap_forward_backward

        model = _model(quick)
        techniques = [build_technique("adapter", adapter)] if adapter else []
        opt_tech = build_technique("optimizer", options)
        ctx = Context(model=model, spec=RunSpec.from_model(model), grad_clip=None, techniques=techniques + [opt_tech])
        apply_techniques(ctx)
        ctx.optimizer = build_optimizer(opt_tech, ctx)
        fb = wrap_forward_backward(ctx, "fp32", lambda m, batch: m(**batch).loss)
        variant = _plain("memfit", ctx.model, ctx.optimizer)
        variant.forward_backward = lambda ids: fb(ctx.model, {"input_ids": ids, "labels": ids}, 1.0)
        variant.fused = isinstance(ctx.optimizer, LayerwiseOptimizer)
        return variant

    return build


def _groups_like_memfit(model: nn.Module, **projected: Any) -> list[dict]:
    """memfit's parameter split (`split_groups`) in a reference package's format: the projected group carries the
    package's low-rank options."""
    from memfit.optim.common import split_groups

    return [{"params": g["params"], **(projected if g["project"] else {})} for g in split_groups(model, 0.0)]


def _lomo_optim(cls_name: str, quick: bool) -> Callable[[], Variant]:
    def build() -> Variant:
        import lomo_optim

        model = _model(quick)
        cls = getattr(lomo_optim, cls_name)
        if cls_name == "AdaLomo" and not torch.cuda.is_available():
            original = torch.Tensor.cuda
            torch.Tensor.cuda = lambda self, *a, **k: self  # the package allocates its state with `.cuda()`
            try:
                optimizer = cls(model, lr=LR)
            finally:
                torch.Tensor.cuda = original
        else:
            optimizer = cls(model, lr=LR)
        state = [*getattr(optimizer, "exp_avg_sq", {}).values(), *getattr(optimizer, "exp_avg_sq_row", {}).values(),
                 *getattr(optimizer, "exp_avg_sq_col", {}).values()]

        def fb(ids: torch.Tensor) -> None:
            optimizer.fused_backward(model(input_ids=ids, labels=ids).loss, LR)

        return Variant(f"lomo-optim {cls_name}", model, fb, lambda: None, optimizer, lambda: state, fused=True)

    return build


def _comparisons(quick: bool) -> dict[str, tuple[Callable[[], Variant], dict[str, Callable[[], Variant]]]]:
    """technique -> (memfit's variant, {reference name: its variant}); a reference whose package is missing is left
    out by `_try`."""

    def ref(name: str, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> Callable[[], Variant]:
        def build() -> Variant:
            model = _model(quick)
            return _plain(name, model, make_optimizer(model))

        return build

    def peft_ref(use_dora: bool) -> Callable[[], Variant]:
        def build() -> Variant:
            import peft

            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            model = peft.get_peft_model(_model(quick), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                                       use_dora=use_dora))
            trainable = [p for p in model.parameters() if p.requires_grad]
            return _plain("peft + torch AdamW", model, torch.optim.AdamW(trainable, lr=LR))

        return build

    def torchao_8bit(model: nn.Module):
        from torchao.optim import AdamW8bit

        return AdamW8bit(model.parameters(), lr=LR, weight_decay=0.0)

    def bnb_8bit(model: nn.Module):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=LR, weight_decay=0.0)

    def galore_torch(model: nn.Module):
        import galore_torch

        return galore_torch.GaLoreAdamW(_groups_like_memfit(model, rank=RANK, update_proj_gap=NO_REFRESH, scale=0.25,
                                                            proj_type="std"), lr=LR, no_deprecation_warning=True)

    def apollo_torch(model: nn.Module):
        import apollo_torch

        return apollo_torch.APOLLOAdamW(_groups_like_memfit(model, rank=RANK, update_proj_gap=NO_REFRESH, scale=1.0,
                                                            proj="random", scale_type="channel", proj_type="std"),
                                        lr=LR)

    def adam_mini(model: nn.Module):
        import adam_mini

        c = model.config
        return adam_mini.Adam_mini(named_parameters=model.named_parameters(), lr=LR, weight_decay=0.0,
                                   dim=c.hidden_size, n_heads=c.num_attention_heads,
                                   n_kv_heads=c.num_key_value_heads, verbose=False)

    lora = {"name": "lora", "r": 16, "alpha": 32}
    return {
        "adamw": (_memfit({"name": "adamw", "lr": LR}, quick=quick), {
            "torch AdamW foreach": ref("torch AdamW foreach", lambda m: torch.optim.AdamW(m.parameters(), lr=LR,
                                                                                           foreach=True)),
            "torch AdamW fused": ref("torch AdamW fused", lambda m: torch.optim.AdamW(m.parameters(), lr=LR,
                                                                                       fused=True))}),
        "adamw_8bit": (_memfit({"name": "adamw_8bit", "lr": LR}, quick=quick), {
            "torchao AdamW8bit": ref("torchao AdamW8bit", torchao_8bit),
            "bitsandbytes AdamW8bit": ref("bitsandbytes AdamW8bit", bnb_8bit)}),
        "galore": (_memfit({"name": "galore", "lr": LR, "rank": RANK, "update_proj_gap": NO_REFRESH, "scale": 0.25},
                           quick=quick), {"galore-torch GaLoreAdamW": ref("galore-torch", galore_torch)}),
        "apollo": (_memfit({"name": "apollo", "lr": LR, "rank": RANK, "update_proj_gap": NO_REFRESH, "scale": 1.0},
                           quick=quick), {"apollo-torch APOLLOAdamW": ref("apollo-torch", apollo_torch)}),
        "adam_mini": (_memfit({"name": "adam_mini", "lr": LR}, quick=quick),
                      {"adam-mini Adam_mini": ref("adam-mini", adam_mini)}),
        "lora": (_memfit({"name": "adamw", "lr": LR}, adapter=lora, quick=quick),
                 {"peft LoRA + torch AdamW": peft_ref(use_dora=False)}),
        "dora": (_memfit({"name": "adamw", "lr": LR}, adapter={**lora, "name": "dora"}, quick=quick),
                 {"peft DoRA + torch AdamW": peft_ref(use_dora=True)}),
        "lomo": (_memfit({"name": "lomo", "lr": LR}, quick=quick), {"lomo-optim Lomo": _lomo_optim("Lomo", quick)}),
        "adalomo": (_memfit({"name": "adalomo", "lr": LR}, quick=quick),
                    {"lomo-optim AdaLomo": _lomo_optim("AdaLomo", quick)}),
    }


def state_bytes(variant: Variant) -> int:
    from memfit.memory.measure import state_bytes

    return state_bytes(variant.optimizer, *variant.state_tensors())


def allocated_growth(fn: Callable[[], None]) -> int:
    """Peak bytes `fn` allocates on the CPU above what was live when it started, from the profiler's memory events
    (the CPU allocator's running total of what was allocated inside the window). Works for compiled code too,
    which a `TorchDispatchMode` such as `MemoryMeter` cannot see (torchao compiles its step)."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events
                if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), default=0)


def measure_bytes(variant: Variant, ids: torch.Tensor) -> dict[str, int]:
    """Optimizer state, the optimizer step's temporaries (peak growth during `step()`; 0 when fused into
    backward) and the train step's tensor peak (what is live at its start plus its peak growth)."""
    from memfit.memory.measure import storage_bytes

    live = storage_bytes([*variant.model.parameters(), *variant.model.buffers()]) + state_bytes(variant)
    growth = allocated_growth(lambda: variant.run(ids))
    variant.forward_backward(ids)
    return {"state": state_bytes(variant), "step_temporaries": allocated_growth(variant.step),
            "step_peak": live + growth}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def compare(technique: str, memfit: Variant, refs: list[Variant], data: list[torch.Tensor], rounds: int,
            steps: int) -> list[dict]:
    variants = [memfit, *refs]
    for v in variants:  # warm-up (compilation, lazy state, the one projector refresh)
        v.run(data[0])
    times: dict[str, list[tuple[float, float]]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            runs = [v.run(data[(r * steps + i) % len(data)]) for i in range(steps)]
            times[v.name].append((statistics.median(fb + s for fb, s in runs), statistics.median(s for _, s in runs)))
    mine_bytes = measure_bytes(memfit, data[0])
    rows = []
    for ref in refs:
        ref_bytes = measure_bytes(ref, data[0])
        pairs = list(zip(times[memfit.name], times[ref.name]))
        fused = memfit.fused or ref.fused
        step_ratios = [r / m for (m, _), (r, _) in pairs]
        row = {"technique": technique, "reference": ref.name,
               "memfit_step_ms": round(1e3 * statistics.median(m for (m, _), _ in pairs), 1),
               "ref_step_ms": round(1e3 * statistics.median(r for _, (r, _) in pairs), 1),
               "speed": round(statistics.median(step_ratios), 3), "speed_iqr": _iqr(step_ratios)}
        if not fused:
            opt_ratios = [r / m for (_, m), (_, r) in pairs]
            row.update({"opt_speed": round(statistics.median(opt_ratios), 3), "opt_speed_iqr": _iqr(opt_ratios),
                        "memfit_opt_ms": round(1e3 * statistics.median(m for (_, m), _ in pairs), 2),
                        "ref_opt_ms": round(1e3 * statistics.median(r for _, (_, r) in pairs), 2)})
        row.update({"state_bytes": _ratio(mine_bytes["state"], ref_bytes["state"]),
                    "temporaries_bytes": _ratio(mine_bytes["step_temporaries"], ref_bytes["step_temporaries"]),
                    "step_peak_bytes": _ratio(mine_bytes["step_peak"], ref_bytes["step_peak"]),
                    **{f"memfit_{k}_mib": round(v / 2**20, 2) for k, v in mine_bytes.items()},
                    **{f"ref_{k}_mib": round(v / 2**20, 2) for k, v in ref_bytes.items()}})
        rows.append(row)
    return rows


def _iqr(ratios: list[float]) -> str:
    """The middle half of the paired ratios (how much the shared machine's load moved them)."""
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return f"{q[0]:.2f}-{q[2]:.2f}"


def run(opts: BenchOptions) -> list[dict]:
    rounds, steps = (2, 1) if opts.quick else (21, 1)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, VOCAB, (2, 128), generator=gen) for _ in range(8)]
    rows = []
    for technique, (mine, refs) in _comparisons(opts.quick).items():
        if not opts.wants(technique):
            continue
        t0 = time.perf_counter()
        built = []
        for name, build in refs.items():
            try:
                built.append(build())
            except ImportError as exc:
                row = {"technique": technique, "reference": name, "error": f"not installed: {exc.name}"}
                record_partial(opts, row)
                rows.append(row)
        if not built:
            continue
        for row in compare(technique, mine(), built, data, rounds, steps):
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            record_partial(opts, {"workload": "speed", "method": f"{technique} vs {row['reference']}", **row})
            rows.append(row)
    from memfit.bench.suites import decode_speed

    return rows + decode_speed.run(opts, _model)
