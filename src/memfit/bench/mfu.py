"""Model FLOPs utilisation: achieved FLOP/s against the matmul peak measured on this machine, in the same run."""

from __future__ import annotations

import time

import torch


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0,
                        device: torch.device | None = None) -> float:
    """Best sustained FLOP/s of an n×n matmul over a short window (2n³ FLOPs per matmul)."""
    device = device or torch.device("cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def train_flops_per_token(n_params: int, n_layers: int, hidden: int, seq: int, backward: bool = True,
                          trainable_fraction: float = 1.0) -> float:
    """6N (forward + backward) or 2N (forward only) plus causal attention's QKᵀ and AV (Kaplan et al. 2020).
    Backward costs one forward for the input gradients plus one per trained weight for the weight gradients,
    so a frozen base (adapters) does about 4N, not 6N."""
    attn = 2 * n_layers * hidden * seq  # per token, forward (QK^T + AV over ~seq/2 keys on average, x2 FLOPs)
    forward = 2 * n_params + attn
    return (2 + trainable_fraction) * forward if backward else forward


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_token / peak_flops if peak_flops > 0 else 0.0
