"""The paper-table rows (issue 18 item 2) are well-formed data: cited, valued, expressed in memfit's names, and every
model config they reference builds on the meta device with the parameter count the row states."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml

import memfit.bench
from memfit.techniques.registry import SLOTS, technique_class

HERE = Path(memfit.bench.__file__).parent / "paper_tables"
PRECISIONS = {"32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true"}
KINDS = {"measured_peak", "fits_on_card", "fits_within", "does_not_fit_on_card"}
MEASURES = {"max_memory_allocated", "max_memory_reserved", "active_bytes_peak", "nvml_used", "unknown", "none"}
UNITS = {"GB", "GiB", "G"}
# Keys a row may give a technique beyond what its memfit Config accepts today, and the feature each one stands for.
EXTRA_KEYS = {"paged": "optim.paged", "projection_bits": "optim.galore-int4-projection",
              "projection_group_size": "optim.galore-int4-projection",
              "trainable": "weights.int8-trainable-stochastic-rounding",
              "stochastic_rounding": "weights.int8-trainable-stochastic-rounding"}
# A technique memfit does not have yet must be named in memfit_missing under this prefix (e.g. optim.lomo).
PREFIX = {"optimizer": "optim", "adapter": "adapter", "step": "step", "weights": "weights", "activations": "activations"}


@functools.cache
def table() -> dict:
    return yaml.safe_load((HERE / "rows.yaml").read_text())


def rows() -> list[dict]:
    return table()["rows"]


def test_rows_parse_and_ids_are_unique():
    ids = [r["id"] for r in rows()]
    assert len(ids) >= 25
    assert len(set(ids)) == len(ids), "duplicate row ids"


@pytest.mark.parametrize("row", rows(), ids=lambda r: r["id"])
def test_row_is_cited_valued_and_in_memfit_names(row):
    src = row["source"]
    assert src.get("repo") and src.get("path") and src.get("text"), "citation needs repo, path and the quoted figure"
    assert isinstance(src.get("line"), int) and src["line"] > 0
    assert len(src.get("commit", "")) == 40

    pub = row["published"]
    assert isinstance(pub["value"], (int, float)) and pub["value"] > 0
    assert pub["unit"] in UNITS and pub["kind"] in KINDS and pub["measure"] in MEASURES
    assert pub["device"]

    assert row["precision"]["recipe"] in PRECISIONS
    run = row["run"]
    assert run["nproc"] >= 1 and (run["nproc"] == 1 or run["sharding"] != "none")
    assert run["seq_len"] is None or run["seq_len"] > 0
    missing = set(row["memfit_missing"])
    assert missing <= set(table()["features"]), f"undocumented features: {missing - set(table()['features'])}"
    if run["seq_len"] is None:
        assert "seq.data-dependent" in missing

    for slot in PREFIX:
        blocks = row.get(slot)
        blocks = blocks if isinstance(blocks, list) else [blocks]
        for block in blocks:
            if block is None or block == "backprop" and slot == "step":
                continue
            name = block["name"]
            if name not in SLOTS[slot]:
                assert f"{PREFIX[slot]}.{name}" in missing, f"{slot} '{name}' is not in memfit and not listed as missing"
                continue
            for key in set(block) - set(technique_class(slot, name).Config.model_fields):
                assert key in EXTRA_KEYS, f"{slot} '{name}': key '{key}' is neither a memfit option nor a known extra"
                assert EXTRA_KEYS[key] in missing, f"{slot} '{name}': '{key}' needs {EXTRA_KEYS[key]} in memfit_missing"

    for tool in ("fitcheck", "vramcalc"):
        peer = row["peers"][tool]
        if peer.get("expressible") is False:
            assert peer["why"]
        else:
            assert peer["command"].split()[0] == tool
            assert peer["result"]["value"] > 0 and peer["result"]["unit"] == "GiB"


def test_every_config_builds_on_meta_with_the_stated_size():
    from transformers import AutoConfig, AutoModelForCausalLM

    stated = {}
    for r in rows():
        stated.setdefault(r["model"]["config"], r["model"]["params"])
    for rel, params in stated.items():
        path = HERE / rel
        assert path.is_file(), f"{rel} is referenced but missing"
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n / params - 1) < 0.02, f"{rel}: {n:,} parameters, row states {params:,.0f}"
