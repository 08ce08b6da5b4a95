"""The papers' own peak-memory figures against memfit's prediction (issue 18 item 2): `memfit bench paper-tables`.

Each row of `bench/paper_tables/rows.yaml` (cited, with its exact configuration) is expressed as a memfit recipe —
the model from its `config.json` on the meta device, the row's slots, batch, sequence and precision, on CUDA — and
predicted with `estimate_step` (one rank's `estimate_rank` for FSDP2 / ZeRO-3 rows) plus the `runtime` category.
The prediction compared is what the source measured (`published.measure`): the tensor peak for
`max_memory_allocated` / `active_bytes_peak`, the allocator's reserve for `max_memory_reserved`, the whole device
(context and reserve included) for `nvml_used` and `unknown`; a claim that a run fits (or not) on a card compares
what the step needs not to fail (`runtime.cuda_needed`: tensors, context, cuBLAS workspace).
The peers' stored predictions (fitcheck-llm, vramcalc: `rows.yaml: peers`) sit beside it.

A row memfit cannot express says what is missing (the features of `rows.yaml: features`). Features memfit
approximates are named in the row (`approx`): torch.compile ignored (an upper bound), a data-dependent sequence
length taken as `ASSUMED_SEQ`, option keys memfit lacks dropped. What the row states and memfit's recipe cannot,
the suite models here, from the cited runs' code: bitsandbytes' paged optimizer state (outside torch's allocator,
`PagedState`), an optimizer that steps 16-bit tensors in place (`precision.update: in-place`), a per-layer
update hook that steps every micro-batch (`run.grad_accum_memory`: gradients never accumulate), DDP's gradient
buckets (`DDPBuckets`) and the blocks a streaming run keeps on the GPU (`BlocksOnDevice`).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parents[1] / "paper_tables"
GiB = 2**30
ASSUMED_SEQ = 512
"""Sequence length assumed where the source's data sets it (`seq.data-dependent`)."""

APPROXIMATED = {
    "compile": "torch.compile ignored (fused kernels save less: the prediction is an upper bound)",
    "seq.data-dependent": f"sequence length not published: {ASSUMED_SEQ} tokens assumed",
}
"""Features memfit lacks but can bound, with the assumption stated in the row."""

SUPPORTED = {"model.config", "runtime.cuda", "arch.opt", "optim.paged", "optim.state-dtype-fp32-over-bf16-weights",
             "master_weights.active-block-fp32", "sharding.fsdp", "sharding.zero3", "sharding.ddp-buckets",
             "offload.params-cpu-streaming", "offload.params-and-optimizer-cpu"}
"""Features of `rows.yaml: features` that memfit has now (precisions are read off the recipe schema), or that this
suite models from the row: paged optimizer state (`PagedState`), bnb 32-bit state over bf16 weights (the row's
`state_dtype: fp32` stepped in place, `in_place`), BAdam's fp32 master of the active block (`precision.master: fp32`:
memfit's `train.master_weights: fp32` keeps a master of what trains, which under `adapter: badam` is that block),
sharding over N GPUs: FSDP2 / ZeRO-3 by memfit's per-rank estimate (`memory.sharding.estimate_rank`), DDP as a
whole replica plus its gradient buckets (`DDPBuckets`), ZO2's host-streamed blocks by memfit's `step: zo2` with the
blocks the original keeps on the GPU at once (`other.blocks_on_device`, `BlocksOnDevice`)."""

SHARDED = {"fsdp2-full-shard", "zero3"}
"""`run.sharding` values predicted per rank by `estimate_rank` (ZeRO-3 partitions as FSDP2's full shard does)."""


class BlocksOnDevice:
    """Decoder blocks a streaming run keeps on the device at once beyond the one memfit's `step: zo2` counts. ZO2
    with `overlap: all` (zo2/model/huggingface/opt/mezo_sgd/zo2.py, the block loop) offloads block i-2, computes
    block i-1 and uploads block i on three CUDA streams, so three blocks are resident while a block runs."""

    order = 10**6

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks

    def transform_spec(self, spec):
        return spec

    def estimate(self, spec, base):
        from memfit.zo.zo2 import _in_block

        per_block = sum(p.nbytes for p in spec.model.params if _in_block(p.name)) // max(spec.model.n_layers, 1)
        return base.with_(parameters=base.parameters + (self.blocks - 1) * per_block)

    def step_phases(self, spec, breakdown):
        return None


class DDPBuckets:
    """torch DDP's reducer: every rank holds the whole model, and its gradient buckets are flat tensors as large as
    all the trainable gradients together, allocated when DDP wraps the model and kept (torch docs,
    `DistributedDataParallel(gradient_as_bucket_view=False)`, the default: "the saved memory size will be equal
    to the total gradients size" when it is True). Composed last, into `other` (alive throughout a step)."""

    order = 10**6

    def transform_spec(self, spec):
        return spec

    def estimate(self, spec, base):
        from memfit.memory.estimate import gradient_bytes

        return base.with_(other=base.other + gradient_bytes(spec))

    def step_phases(self, spec, breakdown):
        return None


SUITE_KEYS = {"paged"}
"""Technique keys memfit's configs lack that this suite models itself (`PagedState`)."""

PAGED_MIN_NUMEL = 100_000
"""bitsandbytes pages a state tensor only for parameters of at least 1e5 values (`Optimizer8bit.get_state_buffer`:
`if not self.is_paged or p.numel() < 1e5: torch.zeros_like(...)`); smaller ones stay on the allocator."""


class PagedState:
    """bitsandbytes paged optimizer state (`PagedAdamW8bit`, `paged_adamw_32bit`, ...): `F.get_paged` allocates it
    with `cudaMallocManaged` (CUDA unified memory), outside torch's caching allocator, and the driver evicts its
    pages to host memory under pressure. So it is in none of torch's counters (`max_memory_allocated`, `active_bytes`,
    `max_memory_reserved`), and it need not fit beside the tensors (the authors' "8B full fine-tune on a 24 GB 4090":
    15 GiB of bf16 weights + 15 GiB of 8-bit state). Composed last: the optimizer category of what bnb pages leaves
    the device (`paged` keeps the bytes, reported beside the row); the update runs in bnb's kernels, so the step's
    transients go with it (`estimate.optimizer_step_transients` is 0 without resident state)."""

    order = 10**6
    paged = 0

    def transform_spec(self, spec):
        return spec

    def estimate(self, spec, base):
        trainable = spec.model.trainable
        total = sum(p.numel for p in trainable)
        big = sum(p.numel for p in trainable if p.numel >= PAGED_MIN_NUMEL)
        self.paged = int(base.optimizer * big / total) if total else 0
        return base.with_(optimizer=base.optimizer - self.paged)

    def step_phases(self, spec, breakdown):
        return None


def in_place(technique):
    """The row's optimizer steps its 16-bit tensors in place (`precision.update: in-place`): torch's fused AdamW on
    bf16 parameters (state in the parameter's dtype, rounded to nearest, no temporaries), bitsandbytes' 8-/32-bit
    kernels (GaLore's `GaLoreAdamW8bit`, `paged_adamw_32bit`), as those runs did — not memfit's own bf16-true update
    (an fp32 working copy per parameter and stochastic rounding). The inner technique's estimate is used with its
    state in `state_dtype` when the row sets one (else the parameter's dtype)."""
    from memfit.optim.precision import PrecisionTechnique

    if not isinstance(technique, PrecisionTechnique):
        return technique

    class InPlace(PrecisionTechnique):
        def transform_spec(self, spec):
            return self.inner.transform_spec(self._state_view(spec))

        def estimate(self, spec, base):  # the inner optimizer's own story, gradients included (q_galore's)
            return self.inner.estimate(self._state_view(spec), base)

    return InPlace(technique.inner, master_weights=False, true_low=False)

UNIT_BYTES = {"GiB": 2**30, "G": 2**30, "GB": 10**9}
"""Bytes per unit when the source does not fix it (`unit_base: unknown`): "G" as torch's GiB, "GB" as 10⁹."""



def memfit_precision(name: str) -> str | None:
    """The recipe's `train.precision` for a Lightning precision name, or None when memfit does not take it."""
    from memfit.memory.precision import PRECISIONS

    return name if name in PRECISIONS else None


def _slot_value(slot: str, value: Any, approx: list[str]) -> Any:
    """The row's slot value with keys memfit's technique config does not take dropped (and named in `approx`)."""
    from memfit.techniques.registry import technique_class

    if value is None or isinstance(value, str):
        return value
    fields = technique_class(slot, value["name"]).Config.model_fields
    dropped = [k for k in value if k not in fields and k not in SUITE_KEYS]
    if dropped:
        approx.append(f"{slot} {value['name']}: {', '.join(dropped)} dropped")
    return {k: v for k, v in value.items() if k in fields}


def express(row: dict) -> tuple[dict | None, list[str], list[str]]:
    """(memfit recipe or None, what is missing, the approximations made)."""
    features = yaml.safe_load((HERE / "rows.yaml").read_text())["features"]
    missing, approx = [], []
    precision = memfit_precision(row["precision"]["recipe"])
    if precision is None:
        missing.append(f"needs precision {row['precision']['recipe']}")
    for feature in row["memfit_missing"]:
        if feature in SUPPORTED or feature.startswith("precision."):
            continue
        if feature == "seq.data-dependent" and row["run"]["seq_len"]:
            approx.append(f"sequence length set by the data: its bound {row['run']['seq_len']} taken (an upper bound)")
        elif feature in APPROXIMATED:
            approx.append(APPROXIMATED[feature])
        else:
            missing.append(f"{feature}: {features.get(feature, feature)}")
    run = row["run"]
    if run["nproc"] > 1 and run["sharding"] not in SHARDED | {"ddp"} and not any("sharding" in m for m in missing):
        missing.append(f"{run['nproc']} GPUs")
    if not run["batch_size"]:
        missing.append("run.batch_size: not published")
    if missing:
        return None, missing, approx
    if row["other"].get("compile") and APPROXIMATED["compile"] not in approx:
        approx.append(APPROXIMATED["compile"])
    seq = row["run"]["seq_len"] or ASSUMED_SEQ
    accum = row["run"].get("grad_accum_memory", row["run"]["grad_accum"])
    try:
        slots = {slot: _slot_value(slot, row.get(slot), approx) for slot in ("optimizer", "adapter", "weights",
                                                                                "step")}
        slots["activations"] = [_slot_value("activations", a, approx) for a in row.get("activations") or []]
    except Exception as exc:  # a technique memfit does not register
        return None, [f"technique: {exc}"], approx
    recipe = {"name": row["id"], "task": row["task"], "model": {"path": str(HERE / row["model"]["config"])},
              "data": {"kind": "text", "paths": ["(published run)"], "block_size": seq},
              "train": {"batch_size": run["batch_size"] * (run["nproc"] if run["sharding"] in SHARDED else 1),
                        "grad_accum": accum,
                        "precision": precision, "device": "cuda",
                        **({"master_weights": row["precision"]["master"]} if row["precision"].get("master") else {})},
              **{k: v for k, v in slots.items() if v is not None and v != []}}
    return recipe, [], approx


def predict(recipe: dict, row: dict | None = None) -> dict[str, int]:
    """Predicted bytes on CUDA: tensor peak, the allocator's reserved peak, the device's peak (context included),
    and the optimizer state bitsandbytes pages outside the allocator (`paged`, not in the others). `row` adds
    what the recipe cannot say: the optimizer stepping 16-bit tensors in place, paged optimizer state."""
    import torch

    from memfit.memory.estimate import estimate_step
    from memfit.memory.runtime import cuda_needed, cuda_reserved, with_runtime
    from memfit.plan.meta import meta_model, spec_for
    from memfit.recipe import load_recipe

    rec = load_recipe(recipe)
    spec = spec_for(rec, meta_model(rec), device=torch.device("cuda"))
    techniques = rec.techniques()
    row = row or {}
    if row.get("precision", {}).get("update") == "in-place":
        techniques = [in_place(t) if t.slot == "optimizer" else t for t in techniques]
    paged = PagedState() if (row.get("optimizer") or {}).get("paged") else None
    parts = techniques + ([paged] if paged else []) + ([DDPBuckets()] if row.get("run", {}).get("sharding") == "ddp"
                                                       else [])
    if (row.get("other") or {}).get("blocks_on_device"):
        parts.append(BlocksOnDevice(row["other"]["blocks_on_device"]))
    if row.get("run", {}).get("sharding") in SHARDED:
        from memfit.memory.sharding import estimate_rank

        rank = estimate_rank(spec, parts, row["run"]["nproc"])
        breakdown, tensors = rank.breakdown, rank.peak
        if (row.get("other") or {}).get("fsdp_cpu_offload"):
            # FSDP2's CPUOffloadPolicy: the rank's parameter shards and optimizer state live in host memory (and
            # its reduced gradient shards are copied there); what stays on the device is what every phase adds to
            # them: the units gathered in flight, activations, transients. The shards and state are in every
            # phase, so they come off the peak exactly; gradient shards still counted in a backward peak make it
            # an upper bound.
            tensors -= breakdown.parameters + breakdown.optimizer
            breakdown = breakdown.with_(parameters=0, optimizer=0)
    else:
        breakdown, tensors = estimate_step(spec, parts)
    _, device = with_runtime(breakdown, tensors, spec, techniques)
    return {"tensors": tensors, "reserved": cuda_reserved(tensors), "device": device, "needed": cuda_needed(tensors),
            "paged": paged.paged if paged else 0}


def compared(row: dict, predicted: dict[str, int]) -> int:
    """The predicted figure comparable with what the row's source measured."""
    measure = row["published"]["measure"]
    if measure in ("max_memory_allocated", "active_bytes_peak"):
        return predicted["tensors"]
    if measure == "max_memory_reserved":
        return predicted["reserved"]
    if row["published"]["kind"] != "measured_peak":  # a claim that it ran: what the step needs not to fail
        return predicted["needed"]
    return predicted["device"]


CARD_KINDS = {"fits_on_card", "does_not_fit_on_card"}
"""Claims about a card: its size in "GB" is binary (NVIDIA's "80 GB" A100 has 81920 MiB, the "24 GB" RTX 3090
24576 MiB, as nvidia-smi reports), so a card's capacity is read in GiB whatever unit the text uses."""


def published_bytes(row: dict) -> float:
    pub = row["published"]
    base = pub.get("unit_base")
    if isinstance(base, int):
        return pub["value"] * base
    return pub["value"] * (GiB if pub["kind"] in CARD_KINDS else UNIT_BYTES[pub["unit"]])


def _peer(row: dict, tool: str, published_gib: float) -> tuple[str, float | None]:
    peer = (row.get("peers") or {}).get(tool) or {}
    result = peer.get("result")
    if not result:
        return "-", None
    value = result["value"] * (UNIT_BYTES.get(result.get("unit", "GiB"), GiB)) / GiB
    tag = "" if peer.get("exact") else "~"
    return f"{tag}{value:.2f}", value / published_gib


def table_row(row: dict) -> dict:
    pub = published_bytes(row)
    out: dict[str, Any] = {"id": row["id"], "kind": row["published"]["kind"], "measure": row["published"]["measure"],
                           "published_gib": round(pub / GiB, 2)}
    recipe, missing, approx = express(row)
    for tool in ("fitcheck", "vramcalc"):
        value, ratio = _peer(row, tool, pub / GiB)
        out[f"{tool}_gib"] = value
        out[f"{tool}_ratio"] = round(ratio, 3) if ratio else None
    if recipe is None:
        return {**out, "memfit_gib": None, "ratio": None, "verdict": "missing: " + "; ".join(missing)}
    try:
        predicted = predict(recipe, row)
        pred = compared(row, predicted)
    except Exception as exc:  # an estimate memfit cannot make for this model: say so
        return {**out, "memfit_gib": None, "ratio": None, "verdict": f"cannot estimate: {str(exc).splitlines()[0]}"}
    kind = row["published"]["kind"]
    ratio = pred / pub
    verdict = {"measured_peak": f"{ratio - 1:+.1%}", "fits_on_card": "fits" if pred <= pub else "PREDICTED NOT TO FIT",
               "fits_within": "fits" if pred <= pub else "PREDICTED ABOVE",
               "does_not_fit_on_card": "does not fit" if pred > pub else "PREDICTED TO FIT"}[kind]
    if kind != "measured_peak":
        approx.append(f"tensors + context; with the allocator's reclaimable reserve {predicted['device'] / GiB:.2f} GiB")
    if predicted["paged"]:
        approx.append(f"{predicted['paged'] / GiB:.2f} GiB of optimizer state paged (unified memory, off the allocator)")
    return {**out, "memfit_gib": round(pred / GiB, 2), "ratio": round(ratio, 3),
            "verdict": verdict + (f" (approx: {'; '.join(approx)})" if approx else "")}


def summary(rows: list[dict]) -> dict:
    measured = [r for r in rows if r["kind"] == "measured_peak" and r["ratio"] is not None]
    claims = [r for r in rows if r["kind"] != "measured_peak" and r["ratio"] is not None]
    errors = [abs(r["ratio"] - 1) for r in measured]
    worst = max(measured, key=lambda r: abs(r["ratio"] - 1), default=None)
    return {"id": "summary", "rows": len(rows), "expressed": len(measured) + len(claims),
            "measured_rows_expressed": len(measured),
            "median_abs_error": round(statistics.median(errors), 4) if errors else None,
            "worst": f"{worst['id']} {worst['ratio']:.3f}" if worst else None,
            "claims_held": f"{sum(r['verdict'].startswith(('fits', 'does not')) for r in claims)}/{len(claims)}"}


def run(opts) -> list[dict]:
    rows = [table_row(r) for r in yaml.safe_load((HERE / "rows.yaml").read_text())["rows"]
            if opts.wants(r["id"]) or not opts.only]
    return rows + [summary(rows)]
