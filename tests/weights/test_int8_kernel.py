"""int8 inference through torch's int8 weight-only kernel: close to the decoded weight, used only where it is
correct, and a loud fallback when it is missing or wrong."""


import pytest
import torch
from torch import nn

from memfit.weights import int8 as int8_module
from memfit.weights.linear import QuantLinear
from weights.kernel_fallback import assert_falls_back_loudly


def _pair(inp: int, out: int = 40, group_size=None) -> tuple[QuantLinear, torch.Tensor]:
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(inp, out), "int8", group_size), torch.randn(2, 3, inp)


def _decoded(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    q.fused = False
    try:
        with torch.no_grad():
            return q(x)
    finally:
        q.fused = True


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = torch._weight_int8pack_mm

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", counting)
    return calls


def test_kernel_output_close_to_decoded_weight(kernel_calls):
    q, x = _pair(96)
    with torch.no_grad():
        fast = q(x)
    ref = _decoded(q, x)
    assert kernel_calls  # the kernel ran
    assert fast.shape == ref.shape == (2, 3, 40)
    # bf16 activations and output: about 2^-8 relative per output, never more than 2^-6 of the output scale
    assert (fast - ref).abs().max() <= 2**-6 * ref.abs().max()
    assert not torch.equal(fast, ref)  # it is a different computation, not the decoded path


@pytest.mark.parametrize("inp,group_size", [(100, None), (96, 32)])
def test_unsupported_layers_decode(kernel_calls, inp, group_size):
    """Input widths not a multiple of 16 (the kernel reads out of bounds) and per-group scales decode."""
    q, x = _pair(inp, group_size=group_size)
    with torch.no_grad():
        y = q(x)
    assert not kernel_calls
    assert torch.equal(y, _decoded(q, x))


def test_training_path_keeps_gradients(kernel_calls):
    q, x = _pair(96)
    x.requires_grad_(True)
    y = q(x)
    assert not kernel_calls
    y.sum().backward()
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand_as(x), atol=1e-5)


def test_missing_kernel_falls_back_loudly(monkeypatch, caplog):
    q, x = _pair(96)
    ref = _decoded(q, x)

    def broken(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", broken)
    monkeypatch.setattr(int8_module, "_KERNEL", {})
    assert_falls_back_loudly(q, x, ref, caplog, "_weight_int8pack_mm")


def test_wrong_kernel_result_falls_back(monkeypatch):
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: torch.zeros(x.shape[0], w.shape[0],
                                                                                 dtype=x.dtype))
    monkeypatch.setattr(int8_module, "_KERNEL", {})
    assert not int8_module.int8_kernel_works()


def test_unaligned_weight_decodes(kernel_calls):
    """An int8 weight not 64-byte aligned (a view into a file buffer) crashes the kernel: it must decode."""
    q, x = _pair(64, out=64)
    buf = torch.zeros(q.qweight.numel() + 8, dtype=torch.int8)
    buf[8:] = q.qweight.flatten()
    q.qweight.data = buf[8:].view(64, 64)
    with torch.no_grad():
        y = q(torch.randn(12, 64))
    assert not kernel_calls and y.shape == (12, 64)
