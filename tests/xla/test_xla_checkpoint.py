"""Portable training state between `cpu` and `neuron-xla`: save on one, resume on the other."""

from __future__ import annotations

import pytest

import anychip as ac
from test_xla_step import adamw, data, make

STEPS = 6  # 3 before the move, 3 after; tiny shapes shared with test_xla_step (cached graphs)


OPTIMIZERS = {
    "adamw-warmupcosine": lambda: adamw(STEPS),
    "adamw-constant": lambda: ac.AdamW(lr=1e-2, weight_decay=0.1),
    "sgd-nesterov-warmuplinear": lambda: ac.SGD(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01, schedule=ac.WarmupLinear(1, STEPS)),
    "sgd-momentum-constant": lambda: ac.SGD(lr=5e-2, momentum=0.9),
    "sgd-plain-warmupcosine": lambda: ac.SGD(lr=5e-2, schedule=ac.WarmupCosine(2, STEPS)),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
@pytest.mark.parametrize("first, second", [("cpu", "neuron-xla"), ("neuron-xla", "cpu")])
def test_resume_on_the_other_backend_equals_uninterrupted_cpu(tmp_path, optimizer, first, second):
    batches = data("gpt-tiny", STEPS)
    straight = make("gpt-tiny", "cpu", optimizer())
    expected = [straight(b).loss for b in batches]

    opt = optimizer()
    a = make("gpt-tiny", first, opt)
    got = [a(b).loss for b in batches[:3]]
    ac.save(a, tmp_path)
    b = make("gpt-tiny", second, opt)
    ac.load(tmp_path, b)
    assert b.step_count == 3
    got += [b(x).loss for x in batches[3:]]
    # fp32, the tolerance of the parity tests (measured differences are ~1e-6)
    assert got == pytest.approx(expected, rel=1e-5)
