"""``torch.optim``'s per-parameter update math in ``jax.numpy``, operation for operation.

Each function is the loop body of torch's single-tensor (CPU) implementation
(``torch/optim/sgd.py: _single_tensor_sgd`` and its siblings): the same operations in the same
order, each result rounded to the storage dtype where torch writes a tensor, so a float32 run
matches torch to float32 rounding and a bfloat16 one rounds where torch rounds. ATen's CPU
kernels compute ``addcmul`` as ``self + (value * t1) * t2`` and ``addcdiv`` as
``self + (value * t1) / t2``; the expressions below keep that association.

Hyperparameters (``h``) are scalars that may be traced JAX values (inputs of a jitted step, so
a scheduler changing them does not recompile) or Python floats. Values torch derives on the
host in float64 (``1 - beta1``, ``log(beta1)``, ``1 - lr * weight_decay``) arrive derived, each
rounded to float32 once, as torch's kernels round their scalar arguments. ``t`` is the
parameter's step count *after* this update (torch's ``step_t += 1``), a float32 scalar.
"""

from __future__ import annotations

import math


def _jnp():
    import jax.numpy as jnp

    return jnp


def rounded(x, like):
    """``x`` stored in ``like``'s dtype: where torch writes a tensor of that dtype."""
    return x.astype(like.dtype)


def lerp(start, end, weight):
    """torch's lerp kernel: ``start + w (end - start)`` for ``w < 0.5``, else
    ``end - (end - start)(1 - w)`` (accurate near 1); ``1 - w`` in the weight's precision."""
    if isinstance(weight, (int, float)):
        return start + weight * (end - start) if weight < 0.5 else end - (end - start) * (1.0 - weight)
    jnp = _jnp()
    return jnp.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


def bias_correction(log_beta, t):
    """``1 - beta**t`` as ``-expm1(t log beta)``: torch evaluates it in float64 on the host;
    this keeps float32 within an ulp of that, where ``1 - 0.999**t`` in float32 would be off by
    1e-5 relative at t = 1. ``log_beta = -inf`` (beta = 0) gives 1, as ``1 - 0**t`` does."""
    return -_jnp().expm1(t * log_beta)


def sgd(g, p, slots, h, *, momentum: bool, nesterov: bool, maximize: bool):
    """``_single_tensor_sgd``; slots: ``momentum_buffer`` (with momentum) and ``step``, whose
    being 0 stands for torch's missing buffer (the first buffer is a copy of the gradient)."""
    jnp = _jnp()
    if maximize:
        g = -g
    g = rounded(g + h["weight_decay"] * p, g)  # exact when weight_decay == 0
    out = {}
    if momentum:
        buf = slots["momentum_buffer"]
        later = rounded(rounded(buf * h["momentum"], buf) + h["one_minus_dampening"] * g, buf)
        buf = jnp.where(slots["step"] > 0, later, rounded(g, buf))
        out["momentum_buffer"] = buf
        g = rounded(g + h["momentum"] * buf, g) if nesterov else buf
    return rounded(p + (-h["lr"]) * g, p), out


def adam(g, p, slots, h, t, *, decoupled: bool, amsgrad: bool, maximize: bool):
    """``_single_tensor_adam`` (AdamW is ``decoupled=True``); slots: ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad)."""
    jnp = _jnp()
    if maximize:
        g = -g
    if decoupled:
        p = rounded(p * h["decay"], p)  # decay = 1 - lr * weight_decay, exact 1 without decay
    else:
        g = rounded(g + h["weight_decay"] * p, g)
    m = rounded(lerp(slots["exp_avg"], g, h["one_minus_beta1"]), p)
    v = slots["exp_avg_sq"]
    v = rounded(rounded(v * h["beta2"], v) + (h["one_minus_beta2"] * g) * g, v)
    out = {"exp_avg": m, "exp_avg_sq": v}
    step_size = h["lr"] / bias_correction(h["log_beta1"], t)
    bc2_sqrt = jnp.sqrt(bias_correction(h["log_beta2"], t))
    if amsgrad:
        v = out["max_exp_avg_sq"] = jnp.maximum(slots["max_exp_avg_sq"], v)
    denom = rounded(rounded(rounded(jnp.sqrt(v), v) / bc2_sqrt, v) + h["eps"], v)
    return rounded(p + ((-step_size) * m) / denom, p), out


def rmsprop(g, p, slots, h, *, momentum: bool, centered: bool, maximize: bool):
    """``_single_tensor_rmsprop``; slots: ``square_avg``, ``momentum_buffer`` (momentum > 0),
    ``grad_avg`` (centered)."""
    jnp = _jnp()
    if maximize:
        g = -g
    g = rounded(g + h["weight_decay"] * p, g)
    sq = slots["square_avg"]
    sq = rounded(rounded(sq * h["alpha"], sq) + (h["one_minus_alpha"] * g) * g, sq)
    out = {"square_avg": sq}
    if centered:
        ga = out["grad_avg"] = rounded(lerp(slots["grad_avg"], g, h["one_minus_alpha"]), sq)
        avg = rounded(jnp.sqrt(rounded(sq + (-1.0 * ga) * ga, sq)), sq)
    else:
        avg = rounded(jnp.sqrt(sq), sq)
    avg = rounded(avg + h["eps"], avg)
    if momentum:
        buf = slots["momentum_buffer"]
        buf = out["momentum_buffer"] = rounded(rounded(buf * h["momentum"], buf) + g / avg, buf)
        return rounded(p + (-h["lr"]) * buf, p), out
    return rounded(p + ((-h["lr"]) * g) / avg, p), out


def adagrad(g, p, slots, h, t, *, maximize: bool):
    """``_single_tensor_adagrad`` (dense gradients); slot: ``sum``."""
    jnp = _jnp()
    if maximize:
        g = -g
    g = rounded(g + h["weight_decay"] * p, g)
    clr = h["lr"] / (1.0 + (t - 1.0) * h["lr_decay"])
    s = rounded(slots["sum"] + (1.0 * g) * g, slots["sum"])
    std = rounded(rounded(jnp.sqrt(s), s) + h["eps"], s)
    return rounded(p + ((-clr) * g) / std, p), {"sum": s}


def newton_schulz(x, coefficients: tuple[float, float, float], steps: int, eps: float):
    """``torch.optim._muon._zeropower_via_newtonschulz``: the quintic iteration in bfloat16,
    each matmul and ``addmm`` accumulated in float32 and rounded to bfloat16 once (what torch's
    CPU bfloat16 ``addmm`` does; bit-identical on the shapes tested)."""
    jnp = _jnp()
    f32, bf16 = jnp.float32, jnp.bfloat16
    a, b, c = coefficients
    x = x.astype(bf16)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = jnp.maximum(jnp.linalg.norm(x.astype(f32)).astype(bf16), jnp.asarray(eps, bf16))
    x = (x.astype(f32) / norm.astype(f32)).astype(bf16)
    for _ in range(steps):
        gram = jnp.matmul(x, x.T, preferred_element_type=f32).astype(bf16)
        gram_sq = jnp.matmul(gram, gram, preferred_element_type=f32)
        update = (b * gram.astype(f32) + c * gram_sq).astype(bf16)
        x = (a * x.astype(f32) + jnp.matmul(update, x, preferred_element_type=f32)).astype(bf16)
    return x.T if tall else x


def muon_lr_ratio(adjust_lr_fn, shape) -> float:
    """``torch.optim._muon._adjust_lr``'s factor for a parameter of ``shape``."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def muon(g, p, slots, h, *, nesterov: bool, coefficients, ns_steps: int, eps: float, adjust_lr_fn):
    """``_single_tensor_muon``; slot: ``momentum_buffer`` (zeros at first, as torch)."""
    buf = rounded(lerp(slots["momentum_buffer"], g, h["one_minus_momentum"]), slots["momentum_buffer"])
    direction = rounded(lerp(g, buf, h["momentum"]), g) if nesterov else buf
    ortho = newton_schulz(direction, coefficients, ns_steps, eps)
    p = rounded(p * h["decay"], p)  # torch multiplies unconditionally
    adjusted_lr = h["lr"] * muon_lr_ratio(adjust_lr_fn, p.shape)
    return rounded(p + (-adjusted_lr) * ortho.astype(p.dtype), p), {"momentum_buffer": buf}
