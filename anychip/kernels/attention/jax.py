"""Attention in JAX: ``jax.nn.dot_product_attention`` (layout as in ``reference.py``).

q [B, Hq, T, D], k/v [B, Hk, S, D] are transposed to JAX's [B, T, N, D]. On GPU with bf16/fp16
and a head dim cuDNN takes (a multiple of 8, at most 128) it asks for cuDNN's flash attention,
elsewhere for XLA's (materialised) attention: ``implementation=None`` means XLA in jax 0.10.
Routing torch's SDPA this way made a GPT-2-small bf16 step 1.62x faster on an H100
(DESIGN.md, environment facts). Also: ``sdpa`` below, the same for torch's
``scaled_dot_product_attention`` signature (masks, scale, GQA), used by the torchax override.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def implementation_for(platform: str, dtype, head_dim: int) -> str:
    """"cudnn" where cuDNN flash attention applies, else "xla"."""
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if platform == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def attention(q, k, v, causal: bool, scale: float | None = None, *, implementation: str = "xla"):
    """q [B, Hq, T, D], k/v [B, Hk, S, D] -> [B, Hq, T, D]."""
    out = jax.nn.dot_product_attention(
        jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
        scale=scale, is_causal=causal, implementation=implementation,
    )
    return jnp.swapaxes(out, 1, 2)


def attention_forward(q, k, v, causal: bool, scale: float | None, *, implementation: str = "xla"):
    return attention(q, k, v, causal, scale, implementation=implementation)


def attention_backward(grad, q, k, v, causal: bool, scale: float | None, *, implementation: str = "xla"):
    _, vjp = jax.vjp(lambda q_, k_, v_: attention(q_, k_, v_, causal, scale, implementation=implementation), q, k, v)
    return vjp(grad.astype(q.dtype))


def _sdpa_math(query, key, value, attn_mask, is_causal: bool, scale: float | None):
    compute = jnp.promote_types(query.dtype, jnp.float32)
    groups = query.shape[-3] // key.shape[-3] if query.ndim >= 3 else 1
    if groups > 1:
        key, value = jnp.repeat(key, groups, axis=-3), jnp.repeat(value, groups, axis=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = jnp.einsum("...td,...sd->...ts", query.astype(compute), key.astype(compute)) * scale
    T, S = scores.shape[-2:]
    if is_causal:
        scores = jnp.where(jnp.tril(jnp.ones((T, S), dtype=bool)), scores, -jnp.inf)
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            scores = jnp.where(attn_mask, scores, -jnp.inf)
        else:
            scores = scores + attn_mask.astype(compute)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("...ts,...sd->...td", probs, value.astype(compute)).astype(query.dtype)


def sdpa(
    platform: str, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """torch.nn.functional.scaled_dot_product_attention's contract in JAX (no dropout)."""
    if dropout_p:
        raise NotImplementedError(
            "anychip's JAX override of scaled_dot_product_attention has no dropout; use dropout_p=0 "
            "or install_jax_overrides(..., include_sdpa=False)"
        )
    if query.ndim == 4 and attn_mask is None:
        impl = implementation_for(platform, query.dtype, query.shape[-1])
        return attention(query, key, value, bool(is_causal), scale, implementation=impl)
    return _sdpa_math(query, key, value, attn_mask, bool(is_causal), scale)
