"""Bench rows are kept as they finish: a suite stopped part-way leaves what it measured, and says so on stderr."""

from __future__ import annotations

import json
import logging

from memfit.bench.harness import BenchOptions, record_all


def test_rows_of_a_section_are_recorded_one_by_one(tmp_path, caplog):
    opts = BenchOptions(out_dir=tmp_path, suite="weights")
    rows = [{"method": "fp32"}]
    with caplog.at_level(logging.INFO, logger="memfit"):
        record_all(opts, rows, [{"method": "int8", "wall_s": 1.5}, {"method": "nf4"}])
    assert [r["method"] for r in rows] == ["fp32", "int8", "nf4"]
    kept = [json.loads(line) for line in (tmp_path / "weights.partial.jsonl").read_text().splitlines()]
    assert [r["method"] for r in kept] == ["int8", "nf4"]
    assert sum("[weights]" in m and "done" in m for m in caplog.messages) == 2
