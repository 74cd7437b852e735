"""linear_cross_entropy forward+backward: each implementation vs the unfused reference
(``F.cross_entropy(hidden @ weight.T)``, full logits), see bench_kernel_support.

CUDA: GPT-2 small, 16*1024 tokens, d=768, V=50257, bf16; the point is the memory: the
reference holds [N, V] logits (bf16 and an fp32 copy: about 5 GB), the chunked kernels a
[C, V] chunk. ``peak_MiB_above_inputs`` in extra_info compares them. CPU: 1024 x 256, V=8192.
"""

from __future__ import annotations

import pytest
import torch
from bench_kernel_support import DEVICE, implementations, kernels_arg, maybe_compile, run

from anychip.kernels.linear_cross_entropy import linear_cross_entropy

N, DIM, VOCAB = (16 * 1024, 768, 50257) if DEVICE == "cuda" else (1024, 256, 8192)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("impl", implementations("linear_cross_entropy"))
def test_linear_cross_entropy(benchmark, impl):
    hidden = torch.randn(N, DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(VOCAB, DIM, device=DEVICE) / DIM**0.5).to(DTYPE).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (N,), device=DEVICE)
    fn = maybe_compile(impl, lambda h, w, t: linear_cross_entropy(h, w, t, kernels=kernels_arg(impl)))

    def step():
        torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight))

    # 3 matmuls of 2*N*D*V flops (forward logits, dhidden, dweight); chunked ones add a 4th.
    run(benchmark, "linear_cross_entropy", impl, step, flops=3 * 2 * N * DIM * VOCAB)
