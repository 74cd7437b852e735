"""RMSNorm as a Pallas kernel with a custom VJP (TPU via Mosaic; CPU with interpret=True).

Forward per row:  rstd = rsqrt(mean(x**2) + eps);  y = x * rstd * w.
Backward with xhat = x * rstd, g = w * dy:  dx = rstd * (g - xhat * mean(g * xhat));
dw = sum over rows of dy * xhat, written as one partial per row block and summed by XLA.

x is viewed as [M, N] and tiled in blocks of BLOCK_M full rows: a block's last dim equals the
array's, which Mosaic accepts for any N, and BLOCK_M = 8 matches the TPU's sublane count.
Rows are padded to a multiple of BLOCK_M (padded rows are zeros and produce zeros).
Not verified on a TPU (no TPU available to this project), so the dispatch table marks it
experimental: auto never picks it. Source: the Pallas "quickstart" and layer-norm examples
of the JAX documentation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK_M = 8


def _rms_norm_forward_kernel(x_ref, w_ref, y_ref, *, eps: float):
    x = x_ref[...].astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    y_ref[...] = (x * rstd * w_ref[...].astype(jnp.float32)).astype(y_ref.dtype)


def _rms_norm_backward_kernel(dy_ref, x_ref, w_ref, dx_ref, dw_ref, *, eps: float):
    x = x_ref[...].astype(jnp.float32)
    dy = dy_ref[...].astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    g = dy * w_ref[...].astype(jnp.float32)
    dx = (g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)) * rstd
    dx_ref[...] = dx.astype(dx_ref.dtype)
    dw_ref[...] = jnp.sum(dy * xhat, axis=0, keepdims=True)


def _padded_rows(t: jax.Array) -> tuple[jax.Array, int]:
    t2 = t.reshape(-1, t.shape[-1])
    m = t2.shape[0]
    pad = (-m) % BLOCK_M
    return (jnp.pad(t2, ((0, pad), (0, 0))) if pad else t2), m


def _row_spec(n: int) -> pl.BlockSpec:
    return pl.BlockSpec((BLOCK_M, n), lambda i: (i, 0))


def _forward(x: jax.Array, weight: jax.Array, eps: float, interpret: bool) -> jax.Array:
    x2, m = _padded_rows(x)
    n = x2.shape[1]
    y = pl.pallas_call(
        functools.partial(_rms_norm_forward_kernel, eps=eps),
        out_shape=jax.ShapeDtypeStruct(x2.shape, x.dtype),
        grid=(x2.shape[0] // BLOCK_M,),
        in_specs=[_row_spec(n), pl.BlockSpec((1, n), lambda i: (0, 0))],
        out_specs=_row_spec(n),
        interpret=interpret,
    )(x2, weight.reshape(1, n))
    return y[:m].reshape(x.shape)


def _backward(grad, x, weight, eps: float, interpret: bool):
    x2, m = _padded_rows(x)
    dy2, _ = _padded_rows(grad.astype(x.dtype))
    n = x2.shape[1]
    blocks = x2.shape[0] // BLOCK_M
    dx, dw_partial = pl.pallas_call(
        functools.partial(_rms_norm_backward_kernel, eps=eps),
        out_shape=(
            jax.ShapeDtypeStruct(x2.shape, x.dtype),
            jax.ShapeDtypeStruct((blocks, n), jnp.float32),
        ),
        grid=(blocks,),
        in_specs=[_row_spec(n), _row_spec(n), pl.BlockSpec((1, n), lambda i: (0, 0))],
        out_specs=(_row_spec(n), pl.BlockSpec((1, n), lambda i: (i, 0))),
        interpret=interpret,
    )(dy2, x2, weight.reshape(1, n))
    return dx[:m].reshape(x.shape), jnp.sum(dw_partial, axis=0).astype(weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, weight, eps, interpret):
    return _forward(x, weight, eps, interpret)


def _rms_norm_fwd(x, weight, eps, interpret):
    return _forward(x, weight, eps, interpret), (x, weight)


def _rms_norm_bwd(eps, interpret, residuals, grad):
    x, weight = residuals
    return _backward(grad, x, weight, eps, interpret)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm_forward(x: jax.Array, weight: jax.Array, eps: float, *, interpret: bool = False) -> jax.Array:
    return _forward(x, weight, float(eps), interpret)


def rms_norm_backward(grad, x, weight, eps: float, *, interpret: bool = False):
    return _backward(grad, x, weight, float(eps), interpret)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, interpret: bool = False) -> jax.Array:
    """Differentiable RMSNorm: x [..., N], weight [N] -> [..., N]; interpret=True on a CPU."""
    return _rms_norm(x, weight, float(eps), interpret)
