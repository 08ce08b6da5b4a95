import pytest
import torch

from memfit.activations.streambp import streambp_forward_backward
from memfit.errors import ConfigError
from memfit.memory.estimate import estimate_run
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique

from .conftest import (
    assert_grads_close,
    grads_of,
    hf_loss,
    make_batch,
    make_model,
    measured_activations,
)


def _streambp_grads(model, batch, chunk, scale=1.0):
    model.zero_grad(set_to_none=True)
    loss = streambp_forward_backward(model, batch, scale, chunk)
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_gradients_equal_baseline(chunk):
    batch = make_batch(2, 40)
    ref_loss, ref = grads_of(make_model(), hf_loss, batch)
    loss, got = _streambp_grads(make_model(), batch, chunk)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert_grads_close(got, ref)


def test_padding_and_accumulation():
    batch = make_batch(2, 24)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, -6:] = 0
    ref_batch = {**batch, "labels": batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)}
    model = make_model()
    model.zero_grad()
    for _ in range(2):  # two micro-batches at scale 1/2 accumulate to one batch's gradient
        (hf_loss(model, ref_batch) * 0.5).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model = make_model()
    for _ in range(2):
        streambp_forward_backward(model, batch, 0.5, 7)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref)


def test_technique_wraps_forward_backward_and_estimate():
    model = make_model()
    tech = build_technique("activations", {"name": "streambp", "chunk_size": 16})
    ctx = Context(model=model, spec=RunSpec.from_model(model, batch=2, seq=64), techniques=[tech])
    tech.check(ctx)
    fb = tech.wrap_forward_backward(None, ctx)
    batch = make_batch(2, 64)
    measured = measured_activations(model, None, batch, fb=fb)
    est = estimate_run(RunSpec.from_model(model, batch=2, seq=64), [tech]).activations
    assert abs(measured / est - 1) < 0.15, (measured, est)


def test_bad_config():
    with pytest.raises(ConfigError, match="chunk_size"):
        build_technique("activations", {"name": "streambp", "chunk_size": 0})
    model = make_model()
    techs = [build_technique("activations", n) for n in ("streambp", "checkpointing")]
    with pytest.raises(ConfigError, match="checkpointing"):
        techs[0].check(Context(model=model, spec=RunSpec.from_model(model), techniques=techs))
    bert_like = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="Llama"):
        techs[0].check(Context(model=bert_like, spec=RunSpec.from_model(model), techniques=techs[:1]))


@pytest.mark.parametrize("seq, chunk, vocab", [(512, 64, 256), (384, 128, 4096)])
def test_step_peak_estimate_matches_measured(seq, chunk, vocab):
    """The StreamBP phase model (top layer's backward at long sequence, the chunked loss head at large vocab)
    predicts the measured tensor peak of forward+backward within 5 %."""
    from memfit.memory.estimate import estimate_step
    from memfit.memory.measure import MemoryMeter

    model = make_model("llama-1m", vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=seq)
    tech = build_technique("activations", {"name": "streambp", "chunk_size": chunk})
    spec = RunSpec.from_model(model, batch=1, seq=seq)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    meter = MemoryMeter(model)
    with meter.region():
        streambp_forward_backward(model, {"input_ids": ids, "labels": ids}, 1.0, chunk)
    measured = meter.report().peak.total
    predicted = estimate_step(spec, [tech])[1]
    assert abs(measured / predicted - 1) < 0.05, (measured, predicted)


def _decoder(model_type: str, **fields):
    import transformers

    from .conftest import VOCAB

    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, **fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


@pytest.mark.parametrize("model_type,fields", [("mistral", {"sliding_window": 32}), ("qwen2", {}),
                                               ("qwen3", {"head_dim": 16})])
def test_other_decoders_gradients_equal_baseline(model_type, fields):
    """Mistral (a sequence within its window), Qwen2 (GQA, q/k/v biases), Qwen3 (per-head q/k norms): StreamBP's
    gradients equal plain backprop's, and the technique accepts the model (its chunked layer matches the model's)."""
    batch = make_batch(2, 24)
    ref_loss, ref = grads_of(_decoder(model_type, **fields), hf_loss, batch)
    model = _decoder(model_type, **fields)
    tech = build_technique("activations", {"name": "streambp", "chunk_size": 7})
    ctx = Context(model=model, spec=RunSpec.from_model(model, batch=2, seq=24), techniques=[tech])
    tech.check(ctx)
    tech.apply(ctx)
    loss, got = _streambp_grads(model, batch, 7)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert_grads_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type,fields,match", [
    ("gpt2", {}, "Llama's layout"),
    ("phi3", {"pad_token_id": 0}, "fused q/k/v"),
    ("gemma", {"head_dim": 16}, "scaled"),
])
def test_unsupported_decoders_one_clear_error(model_type, fields, match):
    import transformers

    from .conftest import VOCAB

    if model_type == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB))
    else:
        model = _decoder(model_type, **fields)
    tech = build_technique("activations", {"name": "streambp"})
    with pytest.raises(ConfigError, match=match):
        tech.check(Context(model=model, spec=RunSpec.from_model(model, batch=1, seq=16), techniques=[tech]))


def test_sliding_window_beyond_the_window_is_refused():
    model = _decoder("mistral", sliding_window=16)
    tech = build_technique("activations", {"name": "streambp"})
    with pytest.raises(ConfigError, match="window 16"):
        tech.check(Context(model=model, spec=RunSpec.from_model(model, batch=1, seq=32), techniques=[tech]))
    with pytest.raises(ConfigError, match="window 16"):
        streambp_forward_backward(model, make_batch(1, 32), 1.0, 8)
