from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, TRITON_RUNS, check_jax, check_torch
from support import requires

from anychip.kernels.rotary import reference, rotary, rotary_op, rotary_tables

# (B, Hq, Hk, T, D): an odd half dim (5), grouped-query heads, a power-of-two head dim.
SHAPES = [(2, 3, 1, 7, 10), (1, 4, 4, 16, 16), (3, 2, 2, 5, 6)]
DTYPES = [torch.float32, torch.bfloat16]
JAX_CASES = [(SHAPES[0], torch.float32), (SHAPES[1], torch.bfloat16)]  # each JAX case compiles


def _inputs(shape, dtype):
    B, Hq, Hk, T, D = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, T, D, generator=gen).to(DEVICE, dtype)
    k = torch.randn(B, Hk, T, D, generator=gen).to(DEVICE, dtype)
    cos, sin = rotary_tables(T, D, device=DEVICE)
    return [q, k, cos, sin]


def _reference(q, k, cos, sin):
    return reference.rotary(q, k, cos, sin)


def test_reference_matches_llama_rotate_half():
    q, k, cos, sin = _inputs((1, 2, 2, 6, 8), torch.float64)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    c, s = torch.cat((cos, cos), -1).double(), torch.cat((sin, sin), -1).double()
    q_rot, k_rot = reference.rotary(q, k, cos, sin)
    torch.testing.assert_close(q_rot, q * c + rotate_half(q) * s)
    torch.testing.assert_close(k_rot, k * c + rotate_half(k) * s)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_through_the_custom_op(shape, dtype):
    fn = lambda q, k, c, s: rotary_op(q, k, c, s, "reference")  # noqa: E731
    check_torch(fn, _reference, _inputs(shape, dtype), [0, 1], dtype, "op")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton(shape, dtype):
    fn = lambda q, k, c, s: rotary(q, k, c, s, kernels="triton")  # noqa: E731
    check_torch(fn, _reference, _inputs(shape, dtype), [0, 1], dtype, "triton")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_transposed_views():
    """q, k as [B, T, H, D] projections viewed as [B, H, T, D]: read through strides."""
    B, T, H, D = 2, 5, 3, 8
    q = torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2)
    cos, sin = rotary_tables(T, D, device=DEVICE)
    fn = lambda a, b, c, s: rotary(a, b, c, s, kernels="triton")  # noqa: E731
    check_torch(fn, _reference, [q, k, cos, sin], [0, 1], torch.float32, "transposed")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_gradient_of_one_output_only():
    q, k, cos, sin = _inputs((1, 2, 2, 4, 8), torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_rot, _ = rotary(q, k, cos, sin, kernels="triton")
    dq, dk = torch.autograd.grad(q_rot.sum(), (q, k), allow_unused=True)
    expected = torch.autograd.grad(reference.rotary(q, k, cos, sin)[0].sum(), q)[0]
    torch.testing.assert_close(dq, expected)
    assert dk is None or not dk.any()


@requires("jax")
@pytest.mark.parametrize("shape, dtype", JAX_CASES, ids=str)
def test_jax(shape, dtype):
    from anychip.kernels.rotary import jax as jax_impl

    check_jax(jax_impl.rotary, _reference, _inputs(shape, dtype), [0, 1], dtype, "jax")
