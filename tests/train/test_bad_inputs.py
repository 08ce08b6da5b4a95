"""Every malformed input of the bad-input matrix (`bad_inputs.py`) ends in one clear line (exit 2, no traceback,
naming the file or key) — or, where nothing is lost by carrying on, in a normal run that says what it skipped."""

from __future__ import annotations

import pytest

from .bad_inputs import CASES, Workspace, run_case


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """Inputs built once for the module (the finished run that resume / generate / report cases copy)."""
    return {"root": tmp_path_factory.mktemp("shared"), "cache": {}}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, shared, data_dir, tmp_path):
    ws = Workspace(tmp_path, data_dir, shared["cache"])
    outcome = run_case(case, ws)
    assert outcome.verdict(case) == "clean", (outcome.exit_code, outcome.output, outcome.exception)
