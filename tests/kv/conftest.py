import pytest
import torch

from memfit.models import build_llama

TEXT = "the quick brown fox jumps over the lazy dog. " * 40

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


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved llama-tiny with a byte-level BPE tokenizer trained on a sentence: a local HF model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    path = tmp_path_factory.mktemp("tiny-lm")
    build_llama("llama-tiny", len(fast), seed=0).save_pretrained(path)
    fast.save_pretrained(path)
    return path
