"""The vectorised block quantization (issue 15) is bit-for-bit the plain formulation it replaced: pad to whole blocks,
scale by the block's absmax, binary-search the nearest code, and look codes up by advanced indexing."""

from __future__ import annotations

import pytest
import torch

from memfit.optim import quant


def _plain_quantize(x: torch.Tensor, block_size: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1).float()
    blocks = quant.num_blocks(flat.numel(), block_size)
    padded = torch.nn.functional.pad(flat, (0, blocks * block_size - flat.numel())).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    scaled = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.bucketize(scaled, quant._code(signed)[1]).to(torch.uint8)
    return codes.view(-1)[:flat.numel()].view(x.shape), absmax


def _plain_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int, signed: bool) -> torch.Tensor:
    flat = quant._code(signed)[0][codes.reshape(-1).long()]
    padded = torch.nn.functional.pad(flat, (0, absmax.numel() * block_size - flat.numel())).view(-1, block_size)
    return (padded * absmax.unsqueeze(1)).view(-1)[:flat.numel()].view(codes.shape)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape,block_size", [((64, 96), 256), ((1000,), 256), ((3, 77), 100), ((5,), 256)])
def test_quantize_and_dequantize_equal_plain_formulation(signed, shape, block_size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.logspace(-6, 0, shape[-1])  # several decades inside each block
    if not signed:
        x = x.square()
    x.view(-1)[:block_size // 2] = 0.0  # an all-zero (half) block
    codes, absmax = quant.quantize(x, block_size, signed)
    plain_codes, plain_absmax = _plain_quantize(x, block_size, signed)
    assert codes.dtype == torch.uint8 and torch.equal(codes, plain_codes) and torch.equal(absmax, plain_absmax)
    assert torch.equal(quant.dequantize(codes, absmax, block_size, signed),
                       _plain_dequantize(codes, absmax, block_size, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_infinities_map_to_the_end_codes(signed):
    x = torch.tensor([float("inf"), float("-inf"), 1.0, -1.0, 0.0, -0.0])
    mid = quant._code(signed)[1]
    assert torch.equal(quant.nearest_code(x, signed).long(), torch.bucketize(x, mid))


def test_store_moment_writes_into_the_state_span():
    state: dict = {}
    like = torch.zeros(3 * 256 + 10)
    quant.init_moment(state, "exp_avg", like)
    value = torch.randn(256, generator=torch.Generator().manual_seed(0))
    quant.store_moment(state, "exp_avg", value.clone(), span=(256, 512))
    codes, absmax = quant.quantize(value)
    assert torch.equal(state["exp_avg_q"][256:512], codes) and state["exp_avg_absmax"][1] == absmax[0]
    zero = quant._code(True)[0].abs().argmin()
    assert (state["exp_avg_q"][:256] == zero).all() and (state["exp_avg_q"][512:] == zero).all()
