"""Attention in JAX: ``jax.nn.dot_product_attention`` (layout as in ``reference.py``).

The one lowering policy for attention under torchax, for anychip's attention op and for torch's
``scaled_dot_product_attention`` alike: on GPU with bf16/fp16 and a head dim cuDNN takes (a
multiple of 8, at most 128) try cuDNN's flash attention, else (or when cuDNN refuses the shapes)
XLA's; ``sdpa`` with dropout or inputs that are not 4-D runs the materialised reference, since
``jax.nn.dot_product_attention`` has no dropout. torchax's own SDPA lowering materialises the
scores; routing it here made a GPT-2-small bf16 step 1.62x faster on an H100.
q [B, Hq, T, D], k/v [B, Hk, S, D] are transposed to JAX's [B, T, N, D].
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)
# What cuDNN refusing a shape or dtype raises at trace time.
_REFUSED = (ValueError, NotImplementedError, TypeError)


def implementation_for(platform: str, dtype, head_dim: int) -> str:
    """"cudnn" where cuDNN flash attention applies, else "xla"."""
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if platform == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def _dot_product_attention(platform, q, k, v, *, bias=None, mask=None, causal, scale, used=None):
    """[B, H, T, D] in and out; cuDNN where it applies, XLA otherwise or when cuDNN refuses."""
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    first = implementation_for(platform, q.dtype, q.shape[-1])
    impls = ("cudnn", "xla") if first == "cudnn" else ("xla",)
    for impl in impls:
        try:
            out = jax.nn.dot_product_attention(
                qt, kt, vt, bias=bias, mask=mask, scale=scale, is_causal=causal, implementation=impl
            )
        except _REFUSED as exc:
            if impl == impls[-1]:
                raise
            log.info("anychip: cuDNN attention unavailable for %s (%s); using XLA's", tuple(q.shape), exc)
            continue
        if used is not None:
            used.add(f"attention:{impl}")
        return jnp.swapaxes(out, 1, 2)
    raise AssertionError("unreachable")


def attention(q, k, v, causal: bool, scale: float | None = None, *, platform: str = "cpu", used=None):
    """q [B, Hq, T, D], k/v [B, Hk, S, D] -> [B, Hq, T, D]."""
    return _dot_product_attention(platform, q, k, v, causal=causal, scale=scale, used=used)


def attention_forward(q, k, v, causal: bool, scale: float | None, *, platform: str = "cpu"):
    return attention(q, k, v, causal, scale, platform=platform)


def attention_backward(grad, q, k, v, causal: bool, scale: float | None, *, platform: str = "cpu"):
    _, vjp = jax.vjp(lambda q_, k_, v_: attention(q_, k_, v_, causal, scale, platform=platform), q, k, v)
    return vjp(grad.astype(q.dtype))


def _materialised(q, k, v, bias, mask, dropout_p: float, is_causal: bool, scale: float, dropout_key):
    """The reference math on any rank, with dropout (which jax.nn.dot_product_attention lacks)."""
    compute = jnp.promote_types(q.dtype, jnp.float32)
    if q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        k, v = (jnp.repeat(x, q.shape[-3] // x.shape[-3], axis=-3) for x in (k, v))
    scores = jnp.einsum("...td,...sd->...ts", q.astype(compute), k.astype(compute)) * scale
    if is_causal:
        scores = jnp.where(jnp.tril(jnp.ones(scores.shape[-2:], dtype=bool)), scores, -jnp.inf)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    if bias is not None:
        scores = scores + bias.astype(compute)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_p > 0:
        if dropout_key is None:
            raise ValueError("scaled_dot_product_attention with dropout_p > 0 needs a PRNG key under torchax")
        keep = jax.random.bernoulli(dropout_key(), 1.0 - dropout_p, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_p), 0.0)
    return jnp.einsum("...ts,...sd->...td", probs, v.astype(compute)).astype(q.dtype)


def sdpa(
    platform: str, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    *, dropout_key=None, used=None,
):
    """torch.nn.functional.scaled_dot_product_attention's contract in JAX.

    dropout_key: a callable returning a fresh PRNG key (torchax's
    ``env.get_and_rotate_prng_key``), needed only for dropout_p > 0. ``used`` (a set) records
    what ran: "attention:cudnn", "attention:xla" or "attention:reference".
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    mask = bias = None
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            mask = attn_mask
        else:
            bias = attn_mask.astype(query.dtype)
    if dropout_p > 0 or query.ndim != 4:
        if used is not None:
            used.add("attention:reference")
        return _materialised(query, key, value, bias, mask, float(dropout_p), bool(is_causal), scale, dropout_key)
    # jax wants 4-D masks; torch broadcasts (L, S) or (H, L, S) ones
    mask, bias = (None if m is None else m.reshape((1,) * (4 - m.ndim) + m.shape) for m in (mask, bias))
    return _dot_product_attention(
        platform, query, key, value, bias=bias, mask=mask, causal=bool(is_causal), scale=scale, used=used
    )
