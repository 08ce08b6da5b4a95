"""The papers' own peak-memory figures against memfit's prediction (issue 18 item 2): `memfit bench paper-tables`.

Each row of `bench/paper_tables/rows.yaml` (cited, with its exact configuration) is expressed as a memfit recipe —
the model from its `config.json` on the meta device, the row's slots, batch, sequence and precision, on CUDA — and
predicted with `estimate_step` plus the `runtime` category. The prediction compared is what the source measured
(`published.measure`): the tensor peak for `max_memory_allocated` / `active_bytes_peak`, the allocator's reserve
for `max_memory_reserved`, the whole device (context included) for `nvml_used`, `unknown` and fits-on-card claims.
The peers' stored predictions (fitcheck-llm, vramcalc: `rows.yaml: peers`) sit beside it.

A row memfit cannot express says what is missing (the features of `rows.yaml: features`). Features memfit
approximates are named in the row (`approx`): torch.compile ignored (an upper bound), paged optimizer state counted
resident, a data-dependent sequence length taken as `ASSUMED_SEQ`, option keys memfit lacks dropped.
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
    "optim.paged": "paged optimizer state counted as resident on the GPU",
    "seq.data-dependent": f"sequence length not published: {ASSUMED_SEQ} tokens assumed",
}
"""Features memfit lacks but can bound, with the assumption stated in the row."""

SUPPORTED = {"model.config", "runtime.cuda", "arch.opt"}
"""Features of `rows.yaml: features` that memfit has now (precisions are read off the recipe schema)."""

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
    dropped = [k for k in value if k not in fields]
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
        if feature in APPROXIMATED:
            approx.append(APPROXIMATED[feature])
        else:
            missing.append(f"{feature}: {features.get(feature, feature)}")
    if row["run"]["nproc"] > 1 and not any("sharding" in m for m in missing):
        missing.append(f"{row['run']['nproc']} GPUs")
    if missing:
        return None, missing, approx
    if row["other"].get("compile") and APPROXIMATED["compile"] not in approx:
        approx.append(APPROXIMATED["compile"])
    seq = row["run"]["seq_len"] or ASSUMED_SEQ
    try:
        slots = {slot: _slot_value(slot, row.get(slot), approx) for slot in ("optimizer", "adapter", "weights",
                                                                                "step")}
        slots["activations"] = [_slot_value("activations", a, approx) for a in row.get("activations") or []]
    except Exception as exc:  # a technique memfit does not register
        return None, [f"technique: {exc}"], approx
    recipe = {"name": row["id"], "task": row["task"], "model": {"path": str(HERE / row["model"]["config"])},
              "data": {"kind": "text", "paths": ["(published run)"], "block_size": seq},
              "train": {"batch_size": row["run"]["batch_size"], "grad_accum": row["run"]["grad_accum"],
                        "precision": precision, "device": "cuda"},
              **{k: v for k, v in slots.items() if v is not None and v != []}}
    return recipe, [], approx


def predict(recipe: dict) -> dict[str, int]:
    """Predicted bytes on CUDA: tensor peak, the allocator's reserved peak, the device's peak (context included)."""
    import torch

    from memfit.memory.estimate import estimate_step
    from memfit.memory.runtime import cuda_reserved, with_runtime
    from memfit.plan.meta import meta_model, spec_for
    from memfit.recipe import load_recipe

    rec = load_recipe(recipe)
    spec = spec_for(rec, meta_model(rec), device=torch.device("cuda"))
    techniques = rec.techniques()
    breakdown, tensors = estimate_step(spec, techniques)
    _, device = with_runtime(breakdown, tensors, "cuda")
    return {"tensors": tensors, "reserved": cuda_reserved(tensors), "device": device}


def compared(row: dict, predicted: dict[str, int]) -> int:
    """The predicted figure comparable with what the row's source measured."""
    measure = row["published"]["measure"]
    if measure in ("max_memory_allocated", "active_bytes_peak"):
        return predicted["tensors"]
    if measure == "max_memory_reserved":
        return predicted["reserved"]
    return predicted["device"]


def published_bytes(row: dict) -> float:
    pub = row["published"]
    base = pub.get("unit_base")
    return pub["value"] * (base if isinstance(base, int) else UNIT_BYTES[pub["unit"]])


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
        pred = compared(row, predict(recipe))
    except Exception as exc:  # an estimate memfit cannot make for this model: say so
        return {**out, "memfit_gib": None, "ratio": None, "verdict": f"cannot estimate: {str(exc).splitlines()[0]}"}
    kind = row["published"]["kind"]
    ratio = pred / pub
    verdict = {"measured_peak": f"{ratio - 1:+.1%}", "fits_on_card": "fits" if pred <= pub else "PREDICTED NOT TO FIT",
               "fits_within": "fits" if pred <= pub else "PREDICTED ABOVE",
               "does_not_fit_on_card": "does not fit" if pred > pub else "PREDICTED TO FIT"}[kind]
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
