"""Optimizer and schedule *specs*: plain data that each backend materialises for itself
(``torch.optim`` for the torch backends, optax for JAX), so a run moves between chips with
the same math.

The math, written down once (step ``t`` counts updates from 1; ``lr_t = lr * schedule(t - 1)``):

AdamW (decoupled weight decay, Loshchilov & Hutter 2019; the ``torch.optim.AdamW`` form)::

    m_t = b1 m_{t-1} + (1 - b1) g_t             v_t = b2 v_{t-1} + (1 - b2) g_t^2
    p_t = p_{t-1} - lr_t * ( (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps) + wd * p_{t-1} )

eps is added *after* the square root of the bias-corrected second moment (as torch and
optax.adamw do). Weight decay applies to every parameter, as ``torch.optim.AdamW`` does.

SGD (the ``torch.optim.SGD`` form, weight decay coupled into the gradient)::

    g' = g_t + wd p_{t-1};   b_t = mu b_{t-1} + g'  (b_1 = g');   d = g' + mu b_t if nesterov else b_t
    p_t = p_{t-1} - lr_t d

Gradient clipping (``TrainStep(max_grad_norm=c)``) happens before the optimizer: ``g *= min(1,
c / (||g||_2 + 1e-6))`` over all parameters, as ``torch.nn.utils.clip_grad_norm_``.

Schedules return a multiplier of ``lr`` for the 0-based update index ``s``; each is one
expression over an array namespace ``xp`` (numpy for torch, jax.numpy inside a jitted step),
so both materialisations evaluate literally the same formula.

``to_optax()`` writes the same update in ``jax.numpy``, operation for operation in the order
``torch.optim``'s single-tensor (CPU) path uses, so a ``jax:cpu`` run matches a ``cpu`` run to
float32 rounding. Its state is a NamedTuple with ``count`` (updates applied so far) and one
field per slot name, each a ``{parameter name: array}`` dict: the backend-neutral layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np


class AdamWState(NamedTuple):
    """optax state of :meth:`AdamW.to_optax`: fields named like the torch state slots."""

    count: Any
    exp_avg: Any
    exp_avg_sq: Any


class SGDState(NamedTuple):
    """optax state of :meth:`SGD.to_optax`; ``momentum_buffer`` is None without momentum."""

    count: Any
    momentum_buffer: Any


class Schedule:
    """Learning-rate multiplier as a function of the 0-based update index."""

    def __call__(self, step, xp=np):
        raise NotImplementedError

    def value(self, step: int) -> float:
        return float(self(step))


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    def __call__(self, step, xp=np):
        return xp.ones_like(xp.asarray(step, dtype=xp.float32))


def _check_warmup_total(name: str, warmup: int, total: int, min_ratio: float) -> None:
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"{name}: warmup must be an int >= 0, got {warmup!r}")
    if not (isinstance(total, int) and total > 0 and total >= warmup):
        raise ValueError(f"{name}: total must be an int > 0 and >= warmup ({warmup}), got {total!r}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"{name}: min_ratio must be within [0, 1], got {min_ratio!r}")


def _warmup_then(warmup: int, total: int, step, xp, decay):
    """Linear warm-up to 1 over ``warmup`` updates ((s+1)/warmup), then ``decay(progress)``
    with progress going 0 -> 1 over the remaining ``total - warmup`` updates and held after."""
    s = xp.asarray(step, dtype=xp.float32)
    progress = xp.clip((s - warmup) / max(1, total - warmup), 0.0, 1.0)
    after = decay(progress)
    if warmup == 0:
        return after
    return xp.where(s < warmup, (s + 1.0) / warmup, after)


@dataclasses.dataclass(frozen=True)
class WarmupCosine(Schedule):
    """Linear warm-up, then cosine decay from 1 to ``min_ratio`` at update ``total``."""

    warmup: int
    total: int
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_warmup_total("WarmupCosine", self.warmup, self.total, self.min_ratio)

    def __call__(self, step, xp=np):
        r = self.min_ratio
        return _warmup_then(self.warmup, self.total, step, xp, lambda p: r + (1.0 - r) * 0.5 * (1.0 + xp.cos(math.pi * p)))


@dataclasses.dataclass(frozen=True)
class WarmupLinear(Schedule):
    """Linear warm-up, then linear decay from 1 to ``min_ratio`` at update ``total``."""

    warmup: int
    total: int
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_warmup_total("WarmupLinear", self.warmup, self.total, self.min_ratio)

    def __call__(self, step, xp=np):
        r = self.min_ratio
        return _warmup_then(self.warmup, self.total, step, xp, lambda p: 1.0 - (1.0 - r) * p)


def _check_positive(owner: str, **values: float) -> None:
    for key, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{owner}: {key} must be a finite number >= 0, got {v!r}")


def _bias_correction(beta: float, t, xp):
    """``1 - beta**t`` without cancellation in float32: torch evaluates it in float64 on the
    host; ``-expm1(t log beta)`` keeps float32 within an ulp of that (``1 - 0.999**t`` in
    float32 would be off by 1e-5 relative at t = 1)."""
    if beta == 0.0:
        return xp.ones_like(t)
    return -xp.expm1(t * math.log(beta))


def _lerp(start, end, weight: float):
    # torch's lerp kernel: two formulas depending on the weight, for accuracy near 1.
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def _optax_transform(init, update):
    import optax

    return optax.GradientTransformation(init, update)


class OptimizerSpec:
    """Base of optimizer specs. ``slots`` names the per-parameter state tensors, which is
    also the backend-neutral layout used by ``state_dict()`` and checkpoints."""

    slots: tuple[str, ...] = ()
    schedule: Schedule

    def lr_at(self, step: int) -> float:
        return self.lr * self.schedule.value(step)

    def to_torch(self, params, *, fused: bool = False):
        raise NotImplementedError

    def to_optax(self):
        """An ``optax.GradientTransformation`` with this spec's math; ``update`` needs ``params``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class AdamW(OptimizerSpec):
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    schedule: Schedule = Constant()

    slots = ("exp_avg", "exp_avg_sq")

    def __post_init__(self) -> None:
        _check_positive("AdamW", lr=self.lr, eps=self.eps, weight_decay=self.weight_decay)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"AdamW: schedule must be an anychip schedule such as ac.WarmupCosine(...), got {self.schedule!r}")

    def to_torch(self, params, *, fused: bool = False):
        import torch

        return torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, fused=fused or None
        )


    def to_optax(self):
        import jax
        import jax.numpy as jnp

        b1, b2 = self.betas
        lr, eps, wd, schedule = self.lr, self.eps, self.weight_decay, self.schedule

        def init(params):
            zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
            return AdamWState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

        def update(grads, state, params=None):
            if params is None:
                raise ValueError("AdamW.to_optax().update needs params (decoupled weight decay)")
            lr_t = lr * schedule(state.count, xp=jnp)
            t = (state.count + 1).astype(jnp.float32)
            step_size = lr_t / _bias_correction(b1, t, jnp)
            bc2_sqrt = jnp.sqrt(_bias_correction(b2, t, jnp))

            def one(g, p, m, v):
                # torch.optim.adam._single_tensor_adam, decoupled_weight_decay=True
                new_p = (p * (1.0 - lr_t * wd)).astype(p.dtype) if wd else p
                m = _lerp(m, g, 1.0 - b1).astype(m.dtype)
                v = (v * b2 + (1.0 - b2) * (g * g)).astype(v.dtype)
                denom = jnp.sqrt(v) / bc2_sqrt + eps
                new_p = (new_p + (-step_size) * m / denom).astype(p.dtype)
                # optax adds updates to params; in float32 the difference of two nearby floats
                # is exact (Sterbenz), so p + (new_p - p) == new_p.
                return new_p.astype(jnp.float32) - p.astype(jnp.float32), m, v

            out = jax.tree.map(one, grads, params, state.exp_avg, state.exp_avg_sq)
            pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)  # noqa: E731
            return pick(0), AdamWState(state.count + 1, pick(1), pick(2))

        return _optax_transform(init, update)

@dataclasses.dataclass(frozen=True)
class SGD(OptimizerSpec):
    lr: float = 1e-2
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Schedule = Constant()

    def __post_init__(self) -> None:
        _check_positive("SGD", lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.nesterov and self.momentum <= 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"SGD: schedule must be an anychip schedule such as ac.WarmupCosine(...), got {self.schedule!r}")

    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("momentum_buffer",) if self.momentum > 0 else ()

    def to_torch(self, params, *, fused: bool = False):
        import torch

        return torch.optim.SGD(
            params,
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            fused=fused or None,
        )


    def to_optax(self):
        import jax
        import jax.numpy as jnp

        lr, mu, nesterov, wd, schedule = self.lr, self.momentum, self.nesterov, self.weight_decay, self.schedule

        def init(params):
            buffers = jax.tree.map(jnp.zeros_like, params) if mu > 0 else None
            return SGDState(jnp.zeros((), jnp.int32), buffers)

        def update(grads, state, params=None):
            if params is None:
                raise ValueError("SGD.to_optax().update needs params")
            lr_t = lr * schedule(state.count, xp=jnp)
            first = state.count == 0  # torch creates the buffer as a copy of the first gradient

            def one(g, p, buf):
                # torch.optim.sgd._single_tensor_sgd, dampening=0
                if wd:
                    g = (g + wd * p).astype(g.dtype)
                if mu > 0:
                    buf = jnp.where(first, g, (buf * mu).astype(buf.dtype) + g).astype(buf.dtype)
                    g = (g + mu * buf).astype(g.dtype) if nesterov else buf
                new_p = (p + (-lr_t) * g).astype(p.dtype)
                return new_p.astype(jnp.float32) - p.astype(jnp.float32), buf

            buffers = state.momentum_buffer if mu > 0 else jax.tree.map(lambda _: None, grads)
            out = jax.tree.map(one, grads, params, buffers, is_leaf=lambda x: x is None)
            updates = jax.tree.map(lambda _, o: o[0], grads, out)
            new_buffers = jax.tree.map(lambda _, o: o[1], grads, out) if mu > 0 else None
            return updates, SGDState(state.count + 1, new_buffers)

        return _optax_transform(init, update)
