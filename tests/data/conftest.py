from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from memfit.models import load_model

    return load_model("minilm-l6", "seq_cls", num_labels=2).tokenizer


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = SHARED / "tinyshakespeare" / "input.txt"
    assert path.is_file(), f"shared data missing: {path}"
    return path


@pytest.fixture
def small_corpus(tmp_path, shakespeare) -> Path:
    """About 20k characters of real text in a temp file (fast to train a tokenizer on)."""
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path
