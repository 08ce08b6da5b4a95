import pytest
import torch

from memfit.models import build_llama


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return build_llama("llama-tiny", vocab_size=256, seed=0).eval()
