"""Which backends the TrainStep conformance suite runs on, and how close each must come.

Every test that takes the ``backend`` fixture runs once per backend taken from the registry:
each registration whose probe says available and whose step computes on this machine's CPU
(the registration's ``host_cpu``, or a PJRT backend whose probe reports the CPU client, as
``neuron-xla`` does with ``PJRT_DEVICE=CPU``). ``ANYCHIP_TEST_BACKENDS=cpu,jax:cpu`` names the
backends instead; a name given there is explicit, so an unknown or unavailable one stops the
session with the probe's reason (an explicit name fails loudly) rather than leaving the suite silently empty.

A new backend proves itself by passing this suite: nothing here names one.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

import anychip as ac
from anychip.backends import registration, registrations

ENV = "ANYCHIP_TEST_BACKENDS"


def runs_on_host_cpu(reg, avail) -> bool:
    # host_cpu is fixed in the registration; a PJRT backend learns its client from PJRT_DEVICE
    # only when probed, and reports it as its device kind.
    return reg.host_cpu or avail.device_kind == "PJRT CPU"


def selected_backends() -> list[str]:
    named = [n.strip().lower() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    if not named:
        return [r.name for r in registrations() if (a := r.probe()).available and runs_on_host_cpu(r, a)]
    for name in named:
        try:
            avail = registration(name).probe()
        except ac.UnknownBackendError as exc:
            raise pytest.UsageError(f"${ENV}: {exc}") from None
        if not avail.available:
            raise pytest.UsageError(f"${ENV} names {name!r}, which is unavailable: {avail.reason}")
    return named


BACKENDS = selected_backends()

# Start every backend now, before any test computes a CPU backward in this process: torch_xla
# loses its device for autograd otherwise (see tests/xla/conftest.py). Cheap for the others.
for _name in BACKENDS:
    ac.backend(_name)
ac.reset()


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How close losses and weights must come to the plain-PyTorch loop (all 0: bit-equal)."""

    loss_rtol: float
    weight_rtol: float
    weight_atol: float

    def close(self, got: float, want: float) -> bool:
        return abs(got - want) <= self.loss_rtol * abs(want)


def tolerance(name: str) -> Tolerance:
    reg = registration(name)
    if reg.engine == "torch" and reg.device_type == "cpu":
        # the same torch operations in the same order on the same device as the hand-written loop
        return Tolerance(0.0, 0.0, 0.0)
    # Another compiler (XLA) fuses and reorders fp32 arithmetic: losses differ by ~1e-6. AdamW
    # divides by sqrt(v), so a weight whose gradient is ~0 moves by noise of up to ~1e-5 of its
    # lr-sized step (measured 9e-6 at lr=1e-2); a real error moves every weight by ~lr.
    return Tolerance(1e-5, 1e-5, 5e-5)


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS, ids=BACKENDS)


@pytest.fixture
def tol(backend) -> Tolerance:
    return tolerance(backend)


def pytest_report_header(config):
    return f"conformance backends: {', '.join(BACKENDS) or 'none'} (set ${ENV} to choose)"
