from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import DEVICE, check_jax, check_torch
from support import requires

from anychip.kernels.attention import attention, attention_op, reference

# (B, Hq, Hk, T, S, D, causal): grouped-query heads, odd lengths, T != S without a mask.
CASES = [(2, 4, 2, 9, 9, 16, True), (1, 3, 3, 5, 11, 8, False), (2, 2, 1, 13, 13, 12, True)]
DTYPES = [torch.float32, torch.bfloat16]
# Each JAX case compiles (about a second on a CPU): every case once, bf16 on one.
JAX_CASES = [(CASES[0], torch.bfloat16), (CASES[1], torch.float32), (CASES[2], torch.float32)]


def _inputs(case, dtype):
    B, Hq, Hk, T, S, D, _ = case
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hk, S, D, generator=gen)
    v = torch.randn(B, Hk, S, D, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _reference(causal):
    return lambda q, k, v: reference.attention(q, k, v, causal)


def test_reference_matches_torch_math_sdpa():
    q, k, v = _inputs(CASES[0], torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(reference.attention(q, k, v, True), expected)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_through_the_custom_op(case, dtype):
    causal = case[-1]
    fn = lambda q, k, v: attention_op(q, k, v, causal, None, "reference")  # noqa: E731
    check_torch(fn, _reference(causal), _inputs(case, dtype), [0, 1, 2], dtype, "op")


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa(case, dtype):
    causal = case[-1]
    fn = lambda q, k, v: attention(q, k, v, causal, kernels="sdpa")  # noqa: E731
    check_torch(fn, _reference(causal), _inputs(case, dtype), [0, 1, 2], dtype, "sdpa")


def test_sdpa_through_the_custom_op():
    fn = lambda q, k, v: attention_op(q, k, v, True, 0.3, "sdpa")  # noqa: E731
    ref = lambda q, k, v: reference.attention(q, k, v, True, 0.3)  # noqa: E731
    check_torch(fn, ref, _inputs(CASES[0], torch.float32), [0, 1, 2], torch.float32, "sdpa op")


@requires("jax")
@pytest.mark.parametrize("case, dtype", JAX_CASES, ids=str)
def test_jax(case, dtype):
    from anychip.kernels.attention import jax as jax_impl

    causal = case[-1]
    fn = lambda q, k, v: jax_impl.attention(q, k, v, causal)  # noqa: E731
    check_jax(fn, _reference(causal), _inputs(case, dtype), [0, 1, 2], dtype, "jax")


@requires("jax")
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_jax_sdpa_override_follows_torch_sdpa(mask):
    """The override of torch's own scaled_dot_product_attention (used through torchax)."""
    from kernel_checks import from_jax, to_jax

    from anychip.kernels.attention import jax as jax_impl

    q, k, v = _inputs((2, 2, 2, 6, 6, 8, False), torch.float32)
    attn_mask = {
        "none": None,
        "bool": torch.rand(6, 6, generator=torch.Generator().manual_seed(2)) > 0.3,
        "float": torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(3)),
    }[mask]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[:, 0] = True  # no fully masked row (NaN in both)
    causal = mask == "none"
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=0.5)
    jmask = None if attn_mask is None else to_jax(attn_mask)
    got = jax_impl.sdpa("cpu", to_jax(q), to_jax(k), to_jax(v), attn_mask=jmask, is_causal=causal, scale=0.5)
    torch.testing.assert_close(from_jax(got), expected, rtol=1e-5, atol=1e-5)
    used = set()
    jax_impl.sdpa("cpu", to_jax(q), to_jax(k), to_jax(v), attn_mask=jmask, is_causal=causal, scale=0.5, used=used)
    assert used == {"attention:xla"}


@requires("jax")
def test_jax_sdpa_dropout_runs_the_reference_with_a_key():
    import jax

    from kernel_checks import from_jax, to_jax

    from anychip.kernels.attention import jax as jax_impl

    q, k, v = (to_jax(t) for t in _inputs((2, 2, 2, 6, 6, 8, False), torch.float32))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jax_impl.sdpa("cpu", q, k, v, dropout_p=0.1)
    used = set()
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 2))
    out = from_jax(jax_impl.sdpa("cpu", q, k, v, dropout_p=0.5, dropout_key=lambda: next(keys), used=used))
    assert used == {"attention:reference"} and out.shape == (2, 2, 6, 8) and torch.isfinite(out).all()
    # without dropout but on 3-D inputs: the same materialised reference, no key needed
    three = from_jax(jax_impl.sdpa("cpu", q[0], k[0], v[0], is_causal=True))
    expected = F.scaled_dot_product_attention(from_jax(q)[0], from_jax(k)[0], from_jax(v)[0], is_causal=True)
    torch.testing.assert_close(three, expected, rtol=1e-5, atol=1e-5)


@requires("jax")
def test_jax_asks_for_cudnn_only_where_it_applies():
    import jax.numpy as jnp

    from anychip.kernels.attention.jax import implementation_for

    assert implementation_for("gpu", jnp.bfloat16, 64) == "cudnn"
    assert implementation_for("gpu", jnp.float32, 64) == "xla"
    assert implementation_for("gpu", jnp.bfloat16, 12) == "xla"
    assert implementation_for("tpu", jnp.bfloat16, 64) == "xla"
