"""rotary forward+backward: each implementation vs the reference (see bench_kernel_support).

CUDA: q, k [16, 12, 1024, 64] bf16 (GPT-2-small heads), given as transposed [B, T, H, D]
projections as a model produces them. CPU: [4, 8, 256, 64] fp32.
Memory-bound: GB/s counts q, k in and out, forward and backward (cos/sin are small).
"""

from __future__ import annotations

import pytest
import torch
from bench_kernel_support import DEVICE, implementations, kernels_arg, maybe_compile, run

from anychip.kernels.rotary import rotary, rotary_tables

B, H, T, D = (16, 12, 1024, 64) if DEVICE == "cuda" else (4, 8, 256, 64)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("impl", implementations("rotary"))
def test_rotary(benchmark, impl):
    q = torch.randn(B, T, H, D, device=DEVICE, dtype=DTYPE).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, T, H, D, device=DEVICE, dtype=DTYPE).transpose(1, 2).requires_grad_(True)
    cos, sin = rotary_tables(T, D, device=DEVICE)
    dq, dk = torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE), torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE)
    fn = maybe_compile(impl, lambda a, b: rotary(a, b, cos, sin, kernels=kernels_arg(impl)))

    def step():
        torch.autograd.grad(fn(q, k), (q, k), (dq, dk))

    run(benchmark, "rotary", impl, step, bytes_moved=8 * q.numel() * q.element_size())
