from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, TRITON_RUNS, check_jax, check_torch
from support import requires

from anychip.kernels.rms_norm import reference, rms_norm, rms_norm_op

SHAPES = [(5, 123, 123), (4, 256), (3, 1)]
DTYPES = [torch.float32, torch.bfloat16]
# JAX compiles every case (about a second each on a CPU): each shape once, bf16 on one.
JAX_CASES = [(SHAPES[0], torch.float32), (SHAPES[1], torch.bfloat16), (SHAPES[2], torch.float32)]
EPS = 1e-5


def _inputs(shape, dtype, weight_dtype=None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3
    w = 1 + 0.5 * torch.randn(shape[-1], generator=gen)
    return [x.to(DEVICE, dtype), w.to(DEVICE, weight_dtype or dtype)]


def _near_eps_inputs(dtype):
    """Rows where eps is not negligible: all zeros (y = 0, dx = rstd * w * dy with rstd =
    eps**-0.5), mean(x**2) ~ eps, and ~eps/100. Inputs of mean(x**2) ~ 9 hide a missing eps."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 33, generator=gen) * EPS**0.5
    x[0] = 0
    x[1] *= 0.1
    w = 1 + 0.5 * torch.randn(33, generator=gen)
    return [x.to(DEVICE, dtype), w.to(DEVICE, dtype)]


def _reference(x, w):
    return reference.rms_norm(x, w, EPS)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_through_the_custom_op(shape, dtype):
    """The op's torch kernel with impl="reference" runs the written-out backward."""
    fn = lambda x, w: rms_norm_op(x, w, EPS, "reference")  # noqa: E731
    check_torch(fn, _reference, _inputs(shape, dtype), [0, 1], dtype, "op")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton(shape, dtype):
    fn = lambda x, w: rms_norm(x, w, EPS, kernels="triton")  # noqa: E731
    check_torch(fn, _reference, _inputs(shape, dtype), [0, 1], dtype, "triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_through_the_custom_op_near_eps(dtype):
    fn = lambda x, w: rms_norm_op(x, w, EPS, "reference")  # noqa: E731
    check_torch(fn, _reference, _near_eps_inputs(dtype), [0, 1], dtype, "op near eps")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_near_eps(dtype):
    fn = lambda x, w: rms_norm(x, w, EPS, kernels="triton")  # noqa: E731
    check_torch(fn, _reference, _near_eps_inputs(dtype), [0, 1], dtype, "triton near eps")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_bf16_activations_with_fp32_weight():
    """fp32 master weight under bf16 activations: y in bf16, dweight in fp32."""
    fn = lambda x, w: rms_norm(x, w, EPS, kernels="triton")  # noqa: E731
    check_torch(fn, _reference, _inputs((6, 50), torch.bfloat16, torch.float32), [0, 1], torch.bfloat16, "mixed")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_reads_strided_rows():
    x = torch.randn(7, 2 * 33, device=DEVICE)[:, :33]  # row stride 66, not 33
    w = torch.randn(33, device=DEVICE)
    fn = lambda a, b: rms_norm(a, b, EPS, kernels="triton")  # noqa: E731
    check_torch(fn, _reference, [x, w], [0, 1], torch.float32, "strided")


@requires("jax")
@pytest.mark.parametrize("shape, dtype", JAX_CASES, ids=str)
def test_jax(shape, dtype):
    from anychip.kernels.rms_norm import jax as jax_impl

    check_jax(lambda x, w: jax_impl.rms_norm(x, w, EPS), _reference, _inputs(shape, dtype), [0, 1], dtype, "jax")


@requires("jax")
@pytest.mark.parametrize("shape, dtype", JAX_CASES, ids=str)
def test_pallas_interpreted(shape, dtype):
    from anychip.kernels.rms_norm import pallas

    fn = lambda x, w: pallas.rms_norm(x, w, EPS, interpret=True)  # noqa: E731
    check_jax(fn, _reference, _inputs(shape, dtype), [0, 1], dtype, "pallas")


@requires("jax")
def test_jax_near_eps():
    from anychip.kernels.rms_norm import jax as jax_impl

    fn = lambda x, w: jax_impl.rms_norm(x, w, EPS)  # noqa: E731
    check_jax(fn, _reference, _near_eps_inputs(torch.float32), [0, 1], torch.float32, "jax near eps")


@requires("jax")
def test_pallas_interpreted_near_eps():
    from anychip.kernels.rms_norm import pallas

    fn = lambda x, w: pallas.rms_norm(x, w, EPS, interpret=True)  # noqa: E731
    check_jax(fn, _reference, _near_eps_inputs(torch.float32), [0, 1], torch.float32, "pallas near eps")
