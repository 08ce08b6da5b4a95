"""Adam-mini (parity with the `adam-mini` package) and 8-bit AdamW: estimate == measured state, behaviour."""

from __future__ import annotations

import copy

import pytest
import torch

from memfit.errors import ConfigError
from memfit.memory.estimate import baseline
from memfit.memory.spec import RunSpec
from memfit.optim.adam_mini import AdamMini, block_kind
from memfit.optim.adamw_8bit import AdamW8bit
from memfit.optim.common import split_groups, state_bytes
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .helpers import batches, max_param_diff, measured_state, tiny, train

adam_mini = pytest.importorskip("adam_mini")


def test_adam_mini_parity_with_reference():
    a, b = tiny(), tiny()
    mine = AdamMini(split_groups(a, 0.1), lr=1e-2, weight_decay=0.1, hidden_size=64, num_heads=4)
    ref = adam_mini.Adam_mini(named_parameters=b.named_parameters(), lr=1e-2, weight_decay=0.1, dim=64, n_heads=4,
                              n_kv_heads=2, verbose=False)
    data = batches(5)
    train(a, mine, data)
    train(b, ref, data)
    assert max_param_diff(a, b) < 1e-5
    kinds = {block_kind(n) for n, _ in a.named_parameters()}
    assert kinds == {"head", "row", "tensor"}


@pytest.mark.parametrize("options", [{"name": "adam_mini"}, {"name": "adamw_8bit", "min_8bit_size": 2048},
                                     {"name": "adamw_8bit", "block_size": 100}])
def test_estimate_equals_measured_state(options):
    model = tiny()
    technique = build_technique("optimizer", options)
    spec = RunSpec.from_model(model, batch=2, seq=16)
    opt = technique.build_optimizer(Context(model=model, spec=spec))
    measured = measured_state(model, opt)
    assert measured == state_bytes(opt) == technique.estimate(spec, baseline(spec)).optimizer
    n = sum(p.numel() for p in model.parameters())
    assert measured < 4.5 * n  # AdamW keeps 8 bytes per parameter


def test_adamw_8bit_tracks_fp32_and_resumes_exactly():
    a, b = tiny(), tiny()
    full = torch.optim.AdamW(a.parameters(), lr=3e-3, foreach=False)
    q = AdamW8bit(b.parameters(), lr=3e-3, min_8bit_size=0)
    data = batches(8)
    la, lb = train(a, full, data), train(b, q, data)
    assert lb[-1] < lb[0] and abs(la[-1] - lb[-1]) < 0.05 * la[-1]
    assert all(s["exp_avg_sq_q"].dtype == torch.uint8 for s in q.state.values())
    c = copy.deepcopy(b)
    q2 = AdamW8bit(c.parameters(), lr=3e-3, min_8bit_size=0)
    q2.load_state_dict(copy.deepcopy(q.state_dict()))
    train(b, q, data[:2])
    train(c, q2, data[:2])
    assert max_param_diff(b, c) == 0.0


def test_adam_mini_needs_names():
    model = tiny()
    with pytest.raises(ConfigError, match="names"):
        AdamMini(model.parameters(), hidden_size=64, num_heads=4)
    with pytest.raises(ConfigError, match="heads"):
        AdamMini(split_groups(model, 0.0), hidden_size=64, num_heads=3)


def test_adamw_8bit_chunked_step_equals_whole_tensor_step(monkeypatch):
    """The chunked 8-bit step (many spans of whole blocks) gives bit-identical weights and codes."""
    from memfit.optim import quant

    a, b = tiny(), tiny()
    data = batches(4)
    train(a, AdamW8bit(a.parameters(), lr=3e-3, min_8bit_size=0, block_size=64), data)
    monkeypatch.setattr(quant, "CHUNK_BLOCKS", 3)  # spans of 192 values: every matrix is cut many times
    monkeypatch.setattr(quant.chunked_spans, "__defaults__", (64, 3))
    q = AdamW8bit(b.parameters(), lr=3e-3, min_8bit_size=0, block_size=64)
    train(b, q, data)
    assert max_param_diff(a, b) == 0.0
    assert len(quant.chunked_spans(b.lm_head.weight.numel(), 64)) > 10


def test_adamw_8bit_step_temporaries_stay_chunk_sized():
    """The step never dequantizes a whole parameter: optimizer memory peaks at the state plus a chunk's worth."""
    from memfit.memory.measure import MemoryMeter
    from memfit.optim import quant

    layer = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB of fp32 weights, 16 chunks
    opt = AdamW8bit(layer.parameters(), lr=1e-3, min_8bit_size=0)
    for _ in range(2):
        layer(torch.randn(4, 1024)).sum().backward()
        meter = MemoryMeter(layer, opt)
        with meter.region():
            opt.step()
        opt.zero_grad(set_to_none=True)
    state = state_bytes(opt)
    chunk = quant.DEFAULT_BLOCK * quant.CHUNK_BLOCKS * 4  # one chunk of fp32 values
    assert meter.report().category_peaks.optimizer - state <= 12 * chunk < layer.weight.numel() * 4


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_lookup_equals_binary_search(signed):
    """The table lookup that encodes 8-bit moments picks exactly the code `torch.bucketize` would, including on
    the midpoints themselves, their float neighbours, zeros and tiny values."""
    from memfit.optim import quant

    values, mid = quant._code(signed)
    g = torch.Generator().manual_seed(0)
    up, down = torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))
    tiny_values = torch.rand(4096, generator=g) * 1e-6
    x = torch.cat([torch.rand(100_000, generator=g), values, mid, up, down, tiny_values, torch.tensor([0.0, -0.0, 1.0])])
    if signed:
        x = torch.cat([x, -x, torch.rand(100_000, generator=g) * 2 - 1])
    else:
        x = x.abs()
    assert torch.equal(quant.nearest_code(x, signed).long(), torch.bucketize(x, mid))
