"""rms_norm forward+backward: each implementation vs the reference (see bench_kernel_support).

CUDA: GPT-2-small activations, 16*1024 rows x 768, bf16. CPU: 4096 x 768, fp32.
Memory-bound: GB/s counts x, w, y (forward) and dy, x, w, dx (backward) once each.
"""

from __future__ import annotations

import pytest
import torch
from bench_kernel_support import DEVICE, implementations, kernels_arg, maybe_compile, run

from anychip.kernels.rms_norm import rms_norm

ROWS, DIM = (16 * 1024, 768) if DEVICE == "cuda" else (4096, 768)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("impl", implementations("rms_norm"))
def test_rms_norm(benchmark, impl):
    x = torch.randn(ROWS, DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = torch.ones(DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)
    fn = maybe_compile(impl, lambda a, b: rms_norm(a, b, 1e-6, kernels=kernels_arg(impl)))

    def step():
        torch.autograd.grad(fn(x, w), (x, w), dy)

    run(benchmark, "rms_norm", impl, step, bytes_moved=5 * x.numel() * x.element_size())
