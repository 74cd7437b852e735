"""attention forward+backward: each implementation vs the reference (see bench_kernel_support).

CUDA: causal, [16, 12, 1024, 64] bf16 (GPT-2 small). CPU: causal, [2, 4, 256, 64] fp32.
Compute-bound: TFLOP/s counts 4*B*H*T*T*D per forward, halved for the causal mask, and the
backward as 2.5 forwards (the FlashAttention paper's convention).
"""

from __future__ import annotations

import pytest
import torch
from bench_kernel_support import DEVICE, implementations, kernels_arg, maybe_compile, run

from anychip.kernels.attention import attention

B, H, T, D = (16, 12, 1024, 64) if DEVICE == "cuda" else (2, 4, 256, 64)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("impl", implementations("attention"))
def test_attention(benchmark, impl):
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    fn = maybe_compile(impl, lambda a, b, c: attention(a, b, c, True, kernels=kernels_arg(impl)))

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    run(benchmark, "attention", impl, step, flops=3.5 * 4 * B * H * T * T * D / 2)
