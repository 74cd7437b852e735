"""SwiGLU in JAX: y = silu(gate) * up in float32, y in the inputs' dtype; XLA fuses it.

Differentiated by JAX autodiff; ``swiglu_backward`` is its VJP for torch-autograd callers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    compute = jnp.promote_types(gate.dtype, jnp.float32)
    return (jax.nn.silu(gate.astype(compute)) * up.astype(compute)).astype(gate.dtype)


def swiglu_forward(gate: jax.Array, up: jax.Array) -> jax.Array:
    return swiglu(gate, up)


def swiglu_backward(grad: jax.Array, gate: jax.Array, up: jax.Array) -> tuple[jax.Array, jax.Array]:
    _, vjp = jax.vjp(swiglu, gate, up)
    return vjp(grad.astype(gate.dtype))
