import pytest
import torch

from memfit.errors import ConfigError
from memfit.speculative import self_speculative_generate, speculative_kv_bytes


def greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones_like(ids), pad_token_id=0)


@pytest.mark.parametrize("draft_layers, lookahead", [(1, 1), (1, 4), (1, 7)])
def test_output_equals_greedy_decoding(sdpa_model, draft_layers, lookahead):
    for seed in range(3):
        ids = torch.randint(0, 256, (1, 10 + seed), generator=torch.Generator().manual_seed(seed))
        got = self_speculative_generate(sdpa_model, ids, 20, draft_layers, lookahead)
        assert torch.equal(got.tokens, greedy(sdpa_model, ids, 20))
        assert got.new_tokens == 20 and got.rounds <= 20 and 0 <= got.accepted <= got.drafted


def test_a_draft_that_always_agrees_is_accepted_whole(sdpa_model):
    """With the draft = the full model minus nothing but its last layer zeroed out, every proposal is accepted:
    rounds drop to ⌈new / (lookahead + 1)⌉ — fails if acceptance were never counted or verification rejected all."""
    import copy

    model = copy.deepcopy(sdpa_model)
    last = model.model.layers[-1]
    for p in (last.self_attn.o_proj.weight, last.mlp.down_proj.weight):
        torch.nn.init.zeros_(p)  # the last layer adds nothing: the 1-layer draft predicts exactly
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    got = self_speculative_generate(model, ids, 20, draft_layers=1, lookahead=4)
    assert got.acceptance == 1.0 and got.rounds == 4  # 1 token from the prompt's forward, then 4 rounds of 5 (-1)
    assert torch.equal(got.tokens, greedy(model, ids, 20))


def test_memory_is_the_full_cache_plus_the_drafts(sdpa_model):
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    got = self_speculative_generate(sdpa_model, ids, 12, draft_layers=1, lookahead=3)
    want = speculative_kv_bytes(sdpa_model, 16 + 12 + 3, 1)  # at most `lookahead` unverified tokens on top
    assert got.kv_bytes["full"] <= want["full"] and got.kv_bytes["draft"] <= want["draft"]
    assert got.kv_bytes["draft"] * 2 <= got.kv_bytes["full"] + 1024  # 1 of 2 layers


@pytest.mark.parametrize("kwargs, match", [({"draft_layers": 0}, "draft-layers"), ({"draft_layers": 2}, "between 1"),
                                           ({"draft_layers": 1, "lookahead": 0}, "lookahead")])
def test_bad_input(sdpa_model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        self_speculative_generate(sdpa_model, torch.ones(1, 3, dtype=torch.long), 4, **kwargs)
