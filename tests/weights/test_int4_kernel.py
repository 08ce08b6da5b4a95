"""int4 / int3 inference through torch's CPU int4 kernel on the stored codes: the stored byte order is the kernel's,
the output is close to the decoded weight's, the kernel is used only where it applies, old checkpoints are
repacked, and a missing or wrong kernel falls back loudly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memfit.errors import CheckpointError
from memfit.weights import apply_weights, load_quantized, save_quantized
from memfit.weights import int4 as int4_module
from memfit.weights.format import pack_nibbles
from memfit.weights.int4 import INT4, pack_codes, unpack_codes
from memfit.weights.linear import QuantLinear
from weights.kernel_fallback import assert_falls_back_loudly


def _pair(inp: int, out: int = 128, fmt: str = "int4", group_size=64, rows: int = 3):
    torch.manual_seed(0)
    return QuantLinear.from_linear(nn.Linear(inp, out), fmt, group_size), torch.randn(2, rows, inp)


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
    real = int4_module.int4_mm

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(int4_module, "int4_mm", counting)
    return calls


@pytest.mark.parametrize("out,k", [(64, 128), (128, 256), (704, 256), (688, 256), (48, 64), (80, 128)])
def test_stored_order_is_the_kernels(out, k):
    codes = torch.randint(0, 16, (out, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(out))
    packed = pack_codes(codes)
    assert packed.shape == (out, k // 2) and packed.is_contiguous()
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
    assert torch.equal(unpack_codes(packed), codes)


def test_other_shapes_keep_row_major_order():
    codes = torch.randint(0, 16, (40, 64), dtype=torch.uint8)
    assert torch.equal(pack_codes(codes), pack_nibbles(codes))


@pytest.mark.parametrize("fmt", ["int4", "int3"])
def test_decoded_weight_is_codes_minus_zero_times_scale(fmt):
    """The blocked order changes where codes sit, not what they decode to: decode = (q − zero)·scale per group,
    recomputed here from the unpacked codes, and row lookups (embeddings) read the same rows."""
    torch.manual_seed(1)
    w = torch.randn(144, 200)  # two 64-row blocks and a 16-row tail
    fmt_obj = int4_module.INT3 if fmt == "int3" else INT4
    t = fmt_obj.encode(w, 64)  # 200 columns padded to 256
    q = unpack_codes(t["qweight"]).float().view(144, 4, 64)
    ref = ((q - t["zero"].float()[..., None]) * t["scale"].float()[..., None]).view(144, 256)[:, :200]
    assert torch.equal(fmt_obj.decode(t, 144, 200), ref)
    rows = torch.tensor([0, 31, 32, 63, 64, 127, 128, 143, 5])
    assert torch.equal(fmt_obj.decode_rows(t, rows, 144, 200), ref[rows])
    assert ((ref - w).abs() <= fmt_obj.error_bound(t, 144, 200)).all()


@pytest.mark.parametrize("fmt,inp,out,group_size,rows", [
    ("int4", 256, 128, 64, 1), ("int4", 256, 128, 64, 17), ("int4", 200, 128, 64, 3), ("int4", 256, 128, 0, 3),
    ("int4", 256, 128, 128, 3), ("int4", 256, 688, 64, 2), ("int3", 256, 128, 64, 3)])
def test_kernel_output_close_to_decoded_weight(kernel_calls, fmt, inp, out, group_size, rows):
    q, x = _pair(inp, out=out, fmt=fmt, group_size=group_size, rows=rows)
    with torch.no_grad():
        fast = q(x)
    ref = _decoded(q, x)
    assert kernel_calls  # the kernel ran
    assert fast.shape == ref.shape == (2, rows, out)
    # bf16 activations, scales and offsets: about 2^-8 relative per output, never more than 2^-6 of the scale
    assert (fast - ref).abs().max() <= 2**-6 * ref.abs().max()
    assert not torch.equal(fast, ref)  # a different computation, not the decoded path


@pytest.mark.parametrize("out,group_size", [(40, 64), (128, 16)])
def test_unsupported_layers_decode(kernel_calls, out, group_size):
    """Output widths not a multiple of 16 (row-major order) and group sizes the kernel lacks decode."""
    q, x = _pair(128, out=out, group_size=group_size)
    with torch.no_grad():
        y = q(x)
    assert not kernel_calls
    assert torch.equal(y, _decoded(q, x))


def test_training_path_keeps_gradients(kernel_calls):
    q, x = _pair(128)
    x.requires_grad_(True)
    q(x).sum().backward()
    assert not kernel_calls
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand_as(x), atol=1e-5)


def test_missing_kernel_falls_back_loudly(monkeypatch, caplog):
    q, x = _pair(128)
    ref = _decoded(q, x)

    def broken(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(int4_module, "int4_mm", broken)
    monkeypatch.setattr(int4_module, "_KERNEL", {})
    assert_falls_back_loudly(q, x, ref, caplog, "_weight_int4pack_mm_for_cpu")


def test_wrong_kernel_result_falls_back(monkeypatch):
    monkeypatch.setattr(int4_module, "int4_mm", lambda x, w, g, s: torch.zeros(x.shape[0], w.shape[0],
                                                                                dtype=x.dtype))
    monkeypatch.setattr(int4_module, "_KERNEL", {})
    assert not int4_module.int4_kernel_works()


def _as_layout_1(directory):
    """Rewrite a checkpoint as memfit wrote it before the blocked order: row-major codes, no layout field."""
    state = load_file(str(directory / "model.safetensors"))
    meta = json.loads((directory / "quantization.json").read_text())
    for name, m in meta["modules"].items():
        m.pop("layout")
        key = name + ".qweight"
        state[key] = pack_nibbles(unpack_codes(state[key])).contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "quantization.json").write_text(json.dumps(meta))


def test_layout_1_checkpoint_is_repacked_on_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    apply_weights(model, "int4", group_size=32)
    save_quantized(model, tmp_path)
    _as_layout_1(tmp_path)
    loaded = load_quantized(tmp_path, model=nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[0].qweight, model[0].qweight)


def test_streaming_refuses_layout_1(tiny_llama, tmp_path):
    from memfit.weights.streaming import StreamedModel

    apply_weights(tiny_llama, "int4", group_size=32)
    save_quantized(tiny_llama, tmp_path)
    _as_layout_1(tmp_path)
    with pytest.raises(CheckpointError, match="older memfit byte order"):
        StreamedModel.from_pretrained(tmp_path, window=1)
