"""Each activation technique hooks into torch/transformers; when the hook stops acting, training must refuse
(CompatError naming the versions) instead of silently saving every activation."""

import pytest

from memfit.activations import checkpointing as ckpt
from memfit.activations.offload import OffloadHooks
from memfit.errors import CompatError
from memfit.memory.spec import RunSpec
from memfit.techniques.base import Context
from memfit.techniques.registry import build_technique
from memfit.train.build import apply_techniques, wrap_forward_backward

from .conftest import hf_loss, make_batch, make_model


def _fb(spec: dict):
    model = make_model()
    tech = build_technique("activations", spec)
    ctx = Context(model=model, spec=RunSpec.from_model(model), techniques=[tech])
    apply_techniques(ctx)
    return model, wrap_forward_backward(ctx, loss_fn=hf_loss)


@pytest.mark.parametrize("spec", [{"name": "checkpointing"}, {"name": "mesa"}, {"name": "s2a"}])
def test_layers_that_bypass_the_wrapped_forward_are_a_compat_error(spec):
    model, fb = _fb(spec)
    fb(model, make_batch(), 1.0)  # the hooks act: no error
    for layer in model.model.layers:  # as if transformers stopped calling `forward` through the attribute
        layer.__dict__.pop("forward")
    with pytest.raises(CompatError, match=r"(checkpoint|compressed).*transformers \d"):
        fb(model, make_batch(), 1.0)


def test_offload_hooks_that_never_pack_are_a_compat_error(monkeypatch):
    model, fb = _fb({"name": "offload", "min_bytes": 0})
    fb(model, make_batch(), 1.0)
    monkeypatch.setattr(OffloadHooks, "__enter__", lambda self: self)  # hooks no longer registered
    monkeypatch.setattr(OffloadHooks, "__exit__", lambda self, *exc: None)
    with pytest.raises(CompatError, match=r"saved-tensor hooks.*torch \d"):
        fb(model, make_batch(), 1.0)


def test_checkpointing_skips_a_decoder_cache_whatever_its_keyword():
    """A layer called with a KV cache and use_cache=True is not recomputed (it would fill the cache twice),
    whether transformers names the argument `past_key_values` (≤ 5.23) or `cache` (5.24+)."""
    import torch
    from transformers import DynamicCache

    layer = torch.nn.Linear(4, 4)
    calls = []
    layer.forward = lambda x, **kw: calls.append(kw) or x
    ckpt.checkpoint_module(layer)
    x = torch.randn(2, 4, requires_grad=True)
    for key in ("past_key_values", "cache"):
        layer(x, **{key: DynamicCache(), "use_cache": True})
    assert layer._memfit_checkpoint_calls == 0
    layer(x)
    assert layer._memfit_checkpoint_calls == 1


def test_streambp_refuses_a_layer_it_does_not_reproduce():
    """StreamBP rebuilds each Llama layer from its parts; a layer that computes something else (a transformers
    change) must be refused at apply, not trained with wrong gradients."""
    import torch

    from memfit.activations.streambp import check_matches_model

    model = make_model()
    check_matches_model(model)  # the shipped Llama layer: equal
    model.model.layers[1].register_forward_hook(
        lambda m, a, out: out + 1 if isinstance(out, torch.Tensor) else (out[0] + 1, *out[1:]))
    with pytest.raises(CompatError, match=r"streambp.*differs.*transformers \d"):
        check_matches_model(model)


@pytest.mark.parametrize("spec", [{"name": "checkpointing"}, {"name": "mesa"}])
def test_layers_run_without_gradients_are_not_a_compat_error(spec):
    """A backbone run under no_grad (as LST runs it) gives these techniques nothing to do; that is not a library
    change, so the checks stay quiet."""
    import torch

    model = make_model()
    tech = build_technique("activations", spec)
    ctx = Context(model=model, spec=RunSpec.from_model(model), techniques=[tech])
    apply_techniques(ctx)

    def frozen_backbone_loss(m, batch):
        with torch.no_grad():
            hidden = m.model(input_ids=batch["input_ids"]).last_hidden_state
        return m.lm_head(hidden).float().logsumexp(-1).mean()

    fb = wrap_forward_backward(ctx, loss_fn=frozen_backbone_loss)
    assert torch.isfinite(fb(model, make_batch(), 1.0))
