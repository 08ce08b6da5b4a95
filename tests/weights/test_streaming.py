"""Weight streaming (LLM in a flash): layers read from safetensors per forward, same tokens as in memory."""

import pytest
import torch

from memfit.errors import BudgetError, CheckpointError, ConfigError
from memfit.models import build_llama
from memfit.weights import apply_weights, save_quantized, weight_bytes
from memfit.weights.streaming import StreamedModel


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_llama("llama-tiny", 256, seed=0, num_hidden_layers=4).eval()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return model, path


def _generate(m, ids, n=12):
    return m.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_streamed_generation_equals_in_memory(saved, window):
    model, path = saved
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _generate(model, ids)
    sm = StreamedModel.from_pretrained(path, window=window)
    try:
        out = _generate(sm, ids)
        assert torch.equal(out, ref)
        total = weight_bytes(model)
        layer = sm.layer_bytes[0]
        assert sm.total_weight_bytes == total
        if window < 4:
            # measured resident weights never exceed resident part + window layers, and stay below the model
            assert sm.peak_resident_bytes == sm.static_bytes + window * layer == sm.planned_peak_bytes
            assert sm.peak_resident_bytes < total
            assert sm.bytes_read >= 12 * 4 * layer  # every decode step re-read every layer
            assert all(p.is_meta for p in sm.layers[0].parameters())  # released after use
        else:
            assert sm.peak_resident_bytes == total
    finally:
        sm.close()


def test_streaming_a_quantized_checkpoint(tmp_path):
    model = build_llama("llama-tiny", 256, seed=0, num_hidden_layers=3).eval()
    apply_weights(model, "int4", group_size=32)
    save_quantized(model, tmp_path)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        ref = _generate(model, ids, 6)
    sm = StreamedModel.from_pretrained(tmp_path, window=1)
    try:
        assert torch.equal(_generate(sm, ids, 6), ref)
        assert sm.peak_resident_bytes < weight_bytes(model)
    finally:
        sm.close()


def test_streaming_errors(saved, tmp_path):
    _, path = saved
    with pytest.raises(ConfigError, match="window"):
        StreamedModel.from_pretrained(path, window=0)
    with pytest.raises(BudgetError, match="lower the window"):
        StreamedModel.from_pretrained(path, window=2, budget_bytes=1000)
    with pytest.raises(CheckpointError):
        StreamedModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("extra_layers", [0, 1, 2])
def test_budget_keeps_layers_resident(saved, extra_layers):
    """LLM in a flash with a budget: as many first layers stay resident as fit next to the streamed window; the
    rest are read in one contiguous read per layer; tokens equal in-memory; resident weights under the budget."""
    model, path = saved
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _generate(model, ids, 8)
    probe = StreamedModel.from_pretrained(path, window=1)
    layer, static = probe.layer_bytes[0], probe.static_bytes
    probe.close()
    budget = static + (1 + extra_layers) * layer + layer // 2  # room for `extra_layers` resident + the window
    sm = StreamedModel.from_pretrained(path, window=1, budget_bytes=budget)
    try:
        assert sm.resident_layers == extra_layers
        sm.reader.reads = 0
        out = _generate(sm, ids, 8)
        assert torch.equal(out, ref)
        assert sm.peak_resident_bytes == sm.planned_peak_bytes <= budget
        streamed = 4 - extra_layers
        loads = 8 * streamed + extra_layers  # streamed layers every forward, resident ones once
        assert sm.bytes_read == loads * layer
        assert sm.reader.reads == loads  # one contiguous read per layer load
        assert all(not p.is_meta for p in sm.layers[0].parameters()) == (extra_layers > 0)
    finally:
        sm.close()


def test_budget_that_fits_everything_streams_nothing(saved):
    model, path = saved
    sm = StreamedModel.from_pretrained(path, window=2, budget_bytes=10 * weight_bytes(model))
    try:
        assert sm.resident_layers == 4 and sm.planned_peak_bytes == weight_bytes(model)
    finally:
        sm.close()
