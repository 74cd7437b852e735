from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, TRITON_RUNS, check_jax, check_torch
from support import requires

from anychip.kernels.linear_cross_entropy import (
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_op,
    reference,
)

DTYPES = [torch.float32, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
# Each JAX case compiles (about a second on a CPU): every reduction once, bf16 on one.
JAX_CASES = [("mean", torch.bfloat16), ("sum", torch.float32), ("none", torch.float32)]
# 37 rows in chunks of 8 (the last chunk short), vocabulary 123: a multiple of neither the
# chunk nor a power of two; every fifth target ignored.
N, D, V, CHUNK = 37, 16, 123, 8


def _inputs(dtype, n=N, vocab=V, ignore_every=5):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, D, generator=gen)
    weight = torch.randn(vocab, D, generator=gen) / D**0.5
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::ignore_every] = -100
    return [hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE)]


def _reference(reduction):
    return lambda h, w, t: reference.linear_cross_entropy(h, w, t, -100, reduction)


def _chunked(kernels, reduction, chunk=CHUNK):
    return lambda h, w, t: linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=chunk, kernels=kernels)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_unfused_cross_entropy(reduction, dtype):
    h, w, t = _inputs(dtype)
    expected = F.cross_entropy(F.linear(h, w).float(), t, reduction=reduction)
    torch.testing.assert_close(reference.linear_cross_entropy(h, w, t, -100, reduction), expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_through_the_custom_op(reduction, dtype):
    fn = lambda h, w, t: linear_cross_entropy_op(h, w, t, -100, reduction, CHUNK, "reference")[0]  # noqa: E731
    check_torch(fn, _reference(reduction), _inputs(dtype), [0, 1], dtype, "op")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_chunked(reduction, dtype):
    check_torch(_chunked("torch_chunked", reduction), _reference(reduction), _inputs(dtype), [0, 1], dtype, "chunked")


@requires("triton")
@pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton(reduction, dtype, monkeypatch):
    from anychip.kernels.linear_cross_entropy import triton as triton_impl

    # Blocks of 32 columns: 123 = 3 full blocks + a partial one, so the online logsumexp
    # crosses block boundaries as it does for V = 50257 on a GPU.
    monkeypatch.setattr(triton_impl, "MAX_BLOCK_V", 32)
    check_torch(_chunked("triton", reduction), _reference(reduction), _inputs(dtype), [0, 1], dtype, "triton")


@requires("jax")
@pytest.mark.parametrize("reduction, dtype", JAX_CASES, ids=str)
def test_jax(reduction, dtype):
    from anychip.kernels.linear_cross_entropy import jax as jax_impl

    fn = lambda h, w, t: jax_impl.linear_cross_entropy(h, w, t, -100, reduction, CHUNK)  # noqa: E731
    check_jax(fn, _reference(reduction), _inputs(dtype), [0, 1], dtype, "jax")


@pytest.mark.parametrize("kernels", ["torch_chunked", "reference"])
def test_leading_dims_and_ignore_index(kernels):
    h, w, t = _inputs(torch.float32, n=24)
    t[t == -100] = 7  # a custom ignore_index (7 is also a valid class: it must be skipped)
    loss = linear_cross_entropy(h.view(2, 12, D), w, t.view(2, 12), ignore_index=7, reduction="none",
                                chunk_size=5, kernels=kernels)
    assert loss.shape == (2, 12)
    expected = F.cross_entropy(F.linear(h, w), t, ignore_index=7, reduction="none").view(2, 12)
    torch.testing.assert_close(loss, expected)


def test_all_targets_ignored_gives_nan_like_cross_entropy():
    h, w, t = _inputs(torch.float32, n=6)
    t[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, t, chunk_size=4, kernels="torch_chunked"))
    assert torch.isnan(F.cross_entropy(F.linear(h, w), t))


def test_default_chunk_size():
    # GPT-2 small at 16x1024 tokens: chunks of 256 rows, so a [256, 50257] fp32 chunk (51 MB)
    # instead of 3.3 GB of logits.
    assert default_chunk_size(16 * 1024, 50257, 768) == 256
    assert default_chunk_size(10, 50257, 768) == 10
    assert default_chunk_size(1, 5, 5) == 1
