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
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


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


class OptimizerSpec:
    """Base of optimizer specs. ``slots`` names the per-parameter state tensors, which is
    also the backend-neutral layout used by ``state_dict()`` and checkpoints."""

    slots: tuple[str, ...] = ()
    schedule: Schedule

    def lr_at(self, step: int) -> float:
        return self.lr * self.schedule.value(step)

    def to_torch(self, params, *, fused: bool = False):
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


def torch_schedule(optimizer, spec: OptimizerSpec):
    """A ``LambdaLR`` that evaluates the spec's schedule; update ``s`` uses ``lr * schedule(s)``."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: spec.schedule.value(s))
