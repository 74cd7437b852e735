"""Optimizer and schedule *specs*: plain data that each backend materialises for itself
(``torch.optim`` for the torch backends, optax for JAX), so a run moves between chips with
the same math.

The math, written down once (step ``t`` counts updates from 1; ``lr_t = lr * schedule(t - 1)``):

AdamW (decoupled weight decay, Loshchilov & Hutter 2019; the ``torch.optim.AdamW`` form)::

    m_t = b1 m_{t-1} + (1 - b1) g_t             v_t = b2 v_{t-1} + (1 - b2) g_t^2
    p_t = p_{t-1} - lr_t * ( (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps) + wd * p_{t-1} )

eps is added *after* the square root of the bias-corrected second moment (as torch and
optax.adamw do). Weight decay applies to every parameter, as ``torch.optim.AdamW`` does, except
those ``no_decay(name, param)`` selects (the usual LLM recipe: ``lambda n, p: p.ndim < 2`` for
biases and norm weights), which form a second parameter group with ``weight_decay=0``.

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
from typing import Any, Callable, NamedTuple

import numpy as np

from anychip import validate
from anychip.backends.jax import optimizer_math
from anychip.errors import InvalidArgumentError


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


@dataclasses.dataclass(frozen=True)
class HostSchedule(Schedule):
    """``TrainStep(lr_scheduler=fn)`` with a spec: ``fn(update) -> factor`` is Python, evaluated
    on the host once per update (a JAX step takes the factor as an input, never as a constant)."""

    fn: Callable[[int], float]

    def __call__(self, step, xp=np):
        if xp is not np:
            raise TypeError("a callable lr_scheduler is evaluated on the host; pass its value into the step")
        return np.asarray(float(self.fn(int(step))), dtype=np.float64)


def _check_warmup_total(schedule) -> None:
    """``warmup`` / ``total`` ints (0 <= warmup <= total, total > 0), ``min_ratio`` in [0, 1];
    stored as plain Python numbers."""
    owner = type(schedule).__name__
    example = f"e.g. {owner}(warmup=100, total=10_000)"
    warmup = validate.integer("warmup", schedule.warmup, min=0, fix=example, owner=owner)
    total = validate.integer("total", schedule.total, min=max(1, warmup), owner=owner,
                             fix=f"total counts every update, the {warmup} of warm-up included; {example}")
    ratio = validate.real("min_ratio", schedule.min_ratio, min=0, max=1, fix=f"e.g. {owner}(..., min_ratio=0.1)", owner=owner)
    for field, value in (("warmup", warmup), ("total", total), ("min_ratio", ratio)):
        object.__setattr__(schedule, field, value)  # frozen: the checked, normalised value


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
        _check_warmup_total(self)

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
        _check_warmup_total(self)

    def __call__(self, step, xp=np):
        r = self.min_ratio
        return _warmup_then(self.warmup, self.total, step, xp, lambda p: 1.0 - (1.0 - r) * p)


_EXAMPLES = {"lr": "3e-4", "eps": "1e-8", "weight_decay": "0.1", "momentum": "0.9"}  # what a fix suggests


def _check_common(spec, **ranges) -> None:
    """The checks every spec shares, each value stored back normalised (frozen dataclass):
    ``ranges`` maps a field to its :func:`anychip.validate.real` bounds; then the schedule and
    the ``no_decay`` rule."""
    owner = type(spec).__name__
    for field, bounds in ranges.items():
        value = validate.real(field, getattr(spec, field), fix=f"e.g. {owner}({field}={_EXAMPLES[field]})", owner=owner, **bounds)
        object.__setattr__(spec, field, value)
    if not isinstance(spec.schedule, Schedule):
        raise validate.fail("schedule", spec.schedule, "an anychip schedule",
                            f"e.g. {owner}(schedule=ac.WarmupCosine(warmup=100, total=10_000))", owner=owner)
    if spec.no_decay is not None and not callable(spec.no_decay):
        raise validate.fail("no_decay", spec.no_decay, "callable(name, param) -> bool or None",
                            "e.g. no_decay=lambda n, p: p.ndim < 2", owner=owner)


def _log(beta: float) -> float:
    """log(beta), -inf for beta = 0 (then the bias correction 1 - 0**t is 1)."""
    return math.log(beta) if beta > 0 else -math.inf


def _lr_factor(schedule, count, factor, jnp):
    """The schedule's multiplier inside the jitted update: from the count, or the host value
    passed in as ``factor`` (a :class:`HostSchedule`, evaluated outside the jit)."""
    if isinstance(schedule, HostSchedule):
        if factor is None:
            raise ValueError("a spec with a callable lr_scheduler needs update(..., factor=) from the host")
        return factor
    return schedule(count, xp=jnp)


def _optax_transform(init, update):
    import optax

    return optax.GradientTransformation(init, update)


class OptimizerSpec:
    """Base of optimizer specs. ``slots`` names the per-parameter state tensors, which is
    also the backend-neutral layout used by ``state_dict()`` and checkpoints."""

    slots: tuple[str, ...] = ()
    schedule: Schedule
    no_decay: Callable | None = None

    def lr_at(self, step: int) -> float:
        return self.lr * self.schedule.value(step)

    def decays(self, named_params) -> dict[str, bool]:
        """``{name: whether weight decay applies}`` for ``(name, parameter)`` pairs."""
        rule = self.no_decay
        return {n: not (rule is not None and bool(rule(n, p))) for n, p in named_params}

    def torch_groups(self, named_params) -> list:
        """Parameter groups for ``to_torch``: one group, or (decayed, ``no_decay``) where the
        rule selects any parameter; the second group has ``weight_decay=0``."""
        named = list(named_params)
        decays = self.decays(named)
        kept = [p for n, p in named if decays[n]]
        exempt = [p for n, p in named if not decays[n]]
        if not exempt:
            return [{"params": kept}]
        return [g for g in ({"params": kept}, {"params": exempt, "weight_decay": 0.0}) if g["params"]]

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
    no_decay: Callable | None = None  # (name, param) -> True for parameters without weight decay

    slots = ("exp_avg", "exp_avg_sq")

    def __post_init__(self) -> None:
        # lr may be a 0-d tensor (torch.optim takes one), stored as its value; eps = 0 divides
        # 0 by 0 where a gradient and its second moment are zero.
        _check_common(self, lr={"min": 0, "tensor": True}, eps={"above": 0}, weight_decay={"min": 0})
        betas = validate.pair("betas", self.betas, min=0, below=1, fix="e.g. AdamW(betas=(0.9, 0.999))", owner="AdamW")
        object.__setattr__(self, "betas", betas)

    def to_torch(self, params, *, fused: bool = False):
        import torch

        return torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, fused=fused or None
        )


    def to_optax(self, decays: dict[str, bool] | None = None):
        """``decays`` ({name: bool}, from :meth:`decays`) exempts parameters from weight decay."""
        import jax
        import jax.numpy as jnp

        b1, b2 = self.betas
        lr, eps, wd, schedule = self.lr, self.eps, self.weight_decay, self.schedule

        def init(params):
            zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
            return AdamWState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

        def update(grads, state, params=None, factor=None):
            if params is None:
                raise ValueError("AdamW.to_optax().update needs params (decoupled weight decay)")
            lr_t = lr * _lr_factor(schedule, state.count, factor, jnp)
            t = (state.count + 1).astype(jnp.float32)

            def one(g, p, m, v, decayed):
                h = {
                    "decay": 1.0 - lr_t * wd if wd and decayed else 1.0, "lr": lr_t, "eps": eps,
                    "one_minus_beta1": 1.0 - b1, "beta2": b2, "one_minus_beta2": 1.0 - b2,
                    "log_beta1": _log(b1), "log_beta2": _log(b2),
                }
                new_p, out = optimizer_math.adam(
                    g, p, {"exp_avg": m, "exp_avg_sq": v}, h, t, decoupled=True, amsgrad=False, maximize=False
                )
                # optax adds updates to params; in float32 the difference of two nearby floats
                # is exact (Sterbenz), so p + (new_p - p) == new_p.
                return new_p.astype(jnp.float32) - p.astype(jnp.float32), out["exp_avg"], out["exp_avg_sq"]

            decayed = {n: True if decays is None else decays[n] for n in grads}
            out = jax.tree.map(one, grads, params, state.exp_avg, state.exp_avg_sq, decayed)
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
    no_decay: Callable | None = None  # (name, param) -> True for parameters without weight decay

    def __post_init__(self) -> None:
        # momentum >= 1 never forgets a gradient: the step grows without bound.
        _check_common(self, lr={"min": 0, "tensor": True}, momentum={"min": 0, "below": 1}, weight_decay={"min": 0})
        object.__setattr__(self, "nesterov", validate.flag("nesterov", self.nesterov, owner="SGD"))
        if self.nesterov and self.momentum <= 0:
            raise InvalidArgumentError(f"SGD: nesterov=True needs momentum > 0, got momentum={self.momentum!r}; "
                                       "e.g. SGD(momentum=0.9, nesterov=True)")

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


    def to_optax(self, decays: dict[str, bool] | None = None):
        """``decays`` ({name: bool}, from :meth:`decays`) exempts parameters from weight decay."""
        import jax
        import jax.numpy as jnp

        lr, mu, nesterov, wd, schedule = self.lr, self.momentum, self.nesterov, self.weight_decay, self.schedule

        def init(params):
            buffers = jax.tree.map(jnp.zeros_like, params) if mu > 0 else None
            return SGDState(jnp.zeros((), jnp.int32), buffers)

        def update(grads, state, params=None, factor=None):
            if params is None:
                raise ValueError("SGD.to_optax().update needs params")
            lr_t = lr * _lr_factor(schedule, state.count, factor, jnp)
            first = state.count == 0  # torch creates the buffer as a copy of the first gradient

            def one(g, p, buf, decayed):
                h = {"weight_decay": wd if decayed else 0.0, "momentum": mu, "one_minus_dampening": 1.0, "lr": lr_t}
                slots = {"momentum_buffer": buf, "step": jnp.where(first, 0.0, 1.0)} if mu > 0 else {}
                new_p, out = optimizer_math.sgd(g, p, slots, h, momentum=mu > 0, nesterov=nesterov, maximize=False)
                return new_p.astype(jnp.float32) - p.astype(jnp.float32), out.get("momentum_buffer")

            buffers = state.momentum_buffer if mu > 0 else jax.tree.map(lambda _: None, grads)
            decayed = {n: True if decays is None else decays[n] for n in grads}
            out = jax.tree.map(one, grads, params, buffers, decayed, is_leaf=lambda x: x is None)
            updates = jax.tree.map(lambda _, o: o[0], grads, out)
            new_buffers = jax.tree.map(lambda _, o: o[1], grads, out) if mu > 0 else None
            return updates, SGDState(state.count + 1, new_buffers)

        return _optax_transform(init, update)
