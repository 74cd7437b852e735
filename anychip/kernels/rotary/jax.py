"""Rotary embedding in JAX, rotate-half convention (layout as in ``reference.py``).

q [B, Hq, T, D], k [B, Hk, T, D], cos/sin [T, D/2]:
    out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)   in float32, out in x's dtype.
XLA fuses it; JAX autodiff differentiates it (cos/sin are constants).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    compute = jnp.promote_types(x.dtype, jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(compute), x[..., half:].astype(compute)
    c, s = cos.astype(compute), sin.astype(compute)
    return jnp.concatenate((x1 * c - x2 * s, x2 * c + x1 * s), axis=-1).astype(x.dtype)


def rotary(q: jax.Array, k: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    cos, sin = jax.lax.stop_gradient(cos), jax.lax.stop_gradient(sin)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rotary_forward(q, k, cos, sin) -> tuple[jax.Array, jax.Array]:
    return rotary(q, k, cos, sin)


def rotary_backward(grad_q, grad_k, cos, sin) -> tuple[jax.Array, jax.Array]:
    """The rotation is orthogonal: the VJP rotates the gradient by -angle."""
    return _rotate(grad_q, cos, -sin), _rotate(grad_k, cos, -sin)
