"""Shared fixtures: paths to the shared data, small recipes, and a quiet, single-threaded torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()

os.environ.setdefault("MEMFIT_CACHE", str(ROOT / ".cache" / "memfit-test"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one intra-op thread: the suite runs many tiny ops, where threads only add contention
torch.set_num_threads(int(os.environ.get("MEMFIT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    """A test that leaves autograd off (e.g. a generator suspended inside `no_grad`) breaks every test after it:
    restore it and fail the test that leaked."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left torch's grad mode disabled")


@pytest.fixture
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA
