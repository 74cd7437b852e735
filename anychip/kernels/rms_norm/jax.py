"""RMSNorm in JAX (jnp): the reference's math, which XLA fuses into one kernel per direction.

    y = x * rsqrt(mean(x**2, -1) + eps) * weight      (float32 inside, y in x's dtype)

x: [..., N], weight: [N]. Differentiated by JAX autodiff; ``rms_norm_backward`` is its VJP for
torchax callers that differentiate with torch autograd instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    compute = _compute_dtype(x.dtype)
    xf = x.astype(compute)
    rstd = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * rstd * weight.astype(compute)).astype(x.dtype)


def rms_norm_forward(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return rms_norm(x, weight, eps)


def rms_norm_backward(grad: jax.Array, x: jax.Array, weight: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    _, vjp = jax.vjp(lambda x_, w_: rms_norm(x_, w_, eps), x, weight)
    return vjp(grad.astype(x.dtype))
