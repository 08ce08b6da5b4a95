import pytest
import torch

from memfit.models import build_llama

torch.set_num_threads(1)  # tiny models: threads only contend on the shared 2-core machine


@pytest.fixture(scope="module")
def model():
    """llama-tiny (2 layers, 4 query heads sharing 2 KV heads, head_dim 16) with eager attention."""
    m = build_llama("llama-tiny", 256, seed=0).eval()
    m.set_attn_implementation("eager")
    return m


@pytest.fixture(scope="module")
def sdpa_model():
    return build_llama("llama-tiny", 256, seed=0).eval()


@pytest.fixture
def prompt():
    return torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
