from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, TRITON_RUNS, check_jax, check_torch
from support import requires

from anychip.kernels.swiglu import reference, swiglu, swiglu_op

SHAPES = [(5, 123, 123), (17,), (2, 64)]
DTYPES = [torch.float32, torch.bfloat16]
JAX_CASES = [(SHAPES[0], torch.float32), (SHAPES[1], torch.bfloat16)]  # each JAX case compiles


def _inputs(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(shape, generator=gen) * 3
    up = torch.randn(shape, generator=gen)
    return [gate.to(DEVICE, dtype), up.to(DEVICE, dtype)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_through_the_custom_op(shape, dtype):
    check_torch(lambda g, u: swiglu_op(g, u, "reference"), reference.swiglu, _inputs(shape, dtype), [0, 1], dtype, "op")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton(shape, dtype):
    fn = lambda g, u: swiglu(g, u, kernels="triton")  # noqa: E731
    check_torch(fn, reference.swiglu, _inputs(shape, dtype), [0, 1], dtype, "triton")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_non_contiguous_inputs():
    gate_up = torch.randn(6, 2 * 40, device=DEVICE)  # gate and up as halves of one projection
    gate, up = gate_up[:, :40], gate_up[:, 40:]
    fn = lambda g, u: swiglu(g, u, kernels="triton")  # noqa: E731
    check_torch(fn, reference.swiglu, [gate, up], [0, 1], torch.float32, "views")


@requires("jax")
@pytest.mark.parametrize("shape, dtype", JAX_CASES, ids=str)
def test_jax(shape, dtype):
    from anychip.kernels.swiglu import jax as jax_impl

    check_jax(jax_impl.swiglu, reference.swiglu, _inputs(shape, dtype), [0, 1], dtype, "jax")
