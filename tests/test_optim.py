"""Schedules give their documented values; specs validate their arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest

import anychip as ac


def test_constant():
    assert [ac.Constant().value(s) for s in (0, 5, 10_000)] == [1.0, 1.0, 1.0]


def test_warmup_cosine_documented_values():
    sched = ac.WarmupCosine(warmup=10, total=110)
    # warm-up: (s + 1) / warmup
    assert sched.value(0) == pytest.approx(0.1)
    assert sched.value(4) == pytest.approx(0.5)
    assert sched.value(9) == pytest.approx(1.0)
    # cosine from 1 at s = warmup to 0 at s = total, held afterwards
    assert sched.value(10) == pytest.approx(1.0)
    assert sched.value(60) == pytest.approx(0.5)
    assert sched.value(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert sched.value(110) == pytest.approx(0.0, abs=1e-7)
    assert sched.value(500) == pytest.approx(0.0, abs=1e-7)


def test_warmup_cosine_min_ratio():
    sched = ac.WarmupCosine(warmup=0, total=100, min_ratio=0.1)
    assert sched.value(0) == pytest.approx(1.0)
    assert sched.value(50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert sched.value(100) == pytest.approx(0.1)


def test_warmup_linear_documented_values():
    sched = ac.WarmupLinear(warmup=4, total=24, min_ratio=0.2)
    assert [sched.value(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert sched.value(14) == pytest.approx(1.0 - 0.8 * 0.5)
    assert sched.value(24) == pytest.approx(0.2)
    assert sched.value(30) == pytest.approx(0.2)


def test_schedule_evaluates_elementwise_on_arrays():
    """The xp form is what the JAX step uses; it must agree with the scalar form."""
    sched = ac.WarmupCosine(warmup=3, total=20, min_ratio=0.05)
    steps = np.arange(25)
    assert np.allclose(sched(steps, xp=np), [sched.value(int(s)) for s in steps])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ac.WarmupCosine(warmup=-1, total=10), "warmup"),
        (lambda: ac.WarmupCosine(warmup=20, total=10), "total"),
        (lambda: ac.WarmupLinear(warmup=1, total=10, min_ratio=2.0), "min_ratio"),
        (lambda: ac.AdamW(lr=-1.0), "lr"),
        (lambda: ac.AdamW(lr=float("nan")), "lr"),
        (lambda: ac.AdamW(betas=(0.9, 1.0)), "betas"),
        (lambda: ac.AdamW(schedule="cosine"), "schedule"),
        (lambda: ac.SGD(nesterov=True), "nesterov"),
        (lambda: ac.SGD(momentum=-0.5), "momentum"),
    ],
)
def test_bad_specs_fail_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_lr_at_follows_schedule():
    spec = ac.AdamW(lr=2e-3, schedule=ac.WarmupLinear(warmup=2, total=4))
    assert [spec.lr_at(s) for s in range(5)] == pytest.approx([1e-3, 2e-3, 2e-3, 1e-3, 0.0])


def test_slots_name_the_neutral_state_layout():
    assert ac.AdamW().slots == ("exp_avg", "exp_avg_sq")
    assert ac.SGD(momentum=0.9).slots == ("momentum_buffer",)
    assert ac.SGD().slots == ()
