"""LM head + cross-entropy in JAX, in token chunks with a custom VJP (logits never whole).

Forward: rows are padded to a multiple of C (padded rows get ignore_index) and viewed as
[N/C, C, d]; ``lax.map`` computes, per chunk, logits = hidden_c @ weight.T ([C, V]),
lse = logsumexp(logits) and loss_i = lse_i - logits_i[t_i]. Only lse ([N]) is kept.
Backward: ``lax.scan`` over chunks recomputes the logits and forms
    dlogits = (exp(logits - lse) - onehot(t)) * scale;  dhidden_c = dlogits @ weight;
    dweight += dlogits.T @ hidden_c   (fp32 carry)
so XLA holds one [C, V] chunk at a time. Same math as ``torch_chunked.py``.
Source: Liger-Kernel's fused linear cross-entropy; "Cut Your Losses in Large-Vocabulary
Language Models" (Wijmans et al., 2024).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _chunks(hidden, targets, ignore_index: int, chunk_size: int):
    n = hidden.shape[0]
    pad = (-n) % chunk_size
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad), constant_values=ignore_index)
    count = (n + pad) // chunk_size
    return hidden.reshape(count, chunk_size, -1), targets.reshape(count, chunk_size)


def _reduce(losses, valid, reduction: str):
    if reduction == "none":
        return losses
    if reduction == "sum":
        return jnp.sum(losses)
    return jnp.sum(losses) / jnp.sum(valid)


def _forward(hidden, weight, targets, ignore_index: int, reduction: str, chunk_size: int):
    n = hidden.shape[0]
    compute = _compute_dtype(hidden.dtype)
    h_chunks, t_chunks = _chunks(hidden, targets, ignore_index, chunk_size)

    def chunk_stats(args):
        h, t = args
        logits = jnp.dot(h, weight.T).astype(compute)
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = t != ignore_index
        z_t = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[:, None], axis=-1)[:, 0]
        return jnp.where(valid, lse - z_t, 0.0).astype(compute), lse

    losses, lse = jax.lax.map(chunk_stats, (h_chunks, t_chunks))
    losses, lse = losses.reshape(-1)[:n], lse.reshape(-1)[:n]
    return _reduce(losses, targets != ignore_index, reduction), lse


def _backward(grad, hidden, weight, targets, lse, ignore_index: int, reduction: str, chunk_size: int):
    n = hidden.shape[0]
    compute = _compute_dtype(hidden.dtype)
    valid = targets != ignore_index
    grad = jnp.asarray(grad, compute)
    if reduction == "none":
        scale = grad
    elif reduction == "sum":
        scale = jnp.broadcast_to(grad, (n,))
    else:
        scale = jnp.broadcast_to(grad / jnp.sum(valid), (n,))
    scale = jnp.where(valid, scale, 0.0).astype(compute)
    h_chunks, t_chunks = _chunks(hidden, targets, ignore_index, chunk_size)
    pad = h_chunks.shape[0] * chunk_size - n
    lse_chunks = jnp.pad(lse.astype(compute), (0, pad)).reshape(-1, chunk_size)
    scale_chunks = jnp.pad(scale, (0, pad)).reshape(-1, chunk_size)
    rows = jnp.arange(chunk_size)

    def step(dweight, args):
        h, t, lse_c, scale_c = args
        logits = jnp.dot(h, weight.T).astype(compute)
        probs = jnp.exp(logits - lse_c[:, None])
        ok = t != ignore_index
        probs = probs.at[rows, jnp.where(ok, t, 0)].add(-ok.astype(compute))
        dlogits = (probs * scale_c[:, None]).astype(hidden.dtype)
        dweight = dweight + jnp.dot(dlogits.T, h).astype(compute)
        return dweight, jnp.dot(dlogits, weight)

    dweight, dhidden = jax.lax.scan(
        step, jnp.zeros(weight.shape, compute), (h_chunks, t_chunks, lse_chunks, scale_chunks)
    )
    return dhidden.reshape(-1, hidden.shape[1])[:n].astype(hidden.dtype), dweight.astype(weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _linear_cross_entropy(hidden, weight, targets, ignore_index, reduction, chunk_size):
    return _forward(hidden, weight, targets, ignore_index, reduction, chunk_size)


def _vjp_forward(hidden, weight, targets, ignore_index, reduction, chunk_size):
    loss, lse = _forward(hidden, weight, targets, ignore_index, reduction, chunk_size)
    return (loss, lse), (hidden, weight, targets, lse)


def _vjp_backward(ignore_index, reduction, chunk_size, residuals, cotangents):
    hidden, weight, targets, lse = residuals
    grad_loss, _ = cotangents  # lse is an auxiliary output, not differentiated (as in torch)
    dhidden, dweight = _backward(grad_loss, hidden, weight, targets, lse, ignore_index, reduction, chunk_size)
    return dhidden, dweight, None


_linear_cross_entropy.defvjp(_vjp_forward, _vjp_backward)


def linear_cross_entropy_forward(hidden, weight, targets, ignore_index: int, reduction: str, chunk_size: int):
    """(loss, lse), differentiable in hidden and weight through the chunked custom VJP."""
    return _linear_cross_entropy(hidden, weight, targets, int(ignore_index), reduction, int(chunk_size))


def linear_cross_entropy_backward(
    grad, hidden, weight, targets, lse, ignore_index: int, reduction: str, chunk_size: int
):
    return _backward(grad, hidden, weight, targets, lse, int(ignore_index), reduction, int(chunk_size))


def linear_cross_entropy(
    hidden, weight, targets, ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 1024
):
    """hidden [N, d], weight [V, d], targets [N] -> loss (scalar, or [N] for "none")."""
    return linear_cross_entropy_forward(hidden, weight, targets, ignore_index, reduction, chunk_size)[0]
