"""swiglu forward+backward: each implementation vs the reference (see bench_kernel_support).

CUDA: a Llama-style MLP activation, 16*1024 x 3072, bf16. CPU: 2048 x 1024, fp32.
Memory-bound: GB/s counts gate, up, y (forward) and dy, gate, up, dgate, dup (backward).
"""

from __future__ import annotations

import pytest
import torch
from bench_kernel_support import DEVICE, implementations, kernels_arg, maybe_compile, run

from anychip.kernels.swiglu import swiglu

SHAPE = (16 * 1024, 3072) if DEVICE == "cuda" else (2048, 1024)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("impl", implementations("swiglu"))
def test_swiglu(benchmark, impl):
    gate = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE, requires_grad=True)
    up = torch.randn(SHAPE, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(gate)
    fn = maybe_compile(impl, lambda g, u: swiglu(g, u, kernels=kernels_arg(impl)))

    def step():
        torch.autograd.grad(fn(gate, up), (gate, up), dy)

    run(benchmark, "swiglu", impl, step, bytes_moved=8 * gate.numel() * gate.element_size())
