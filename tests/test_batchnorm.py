"""BatchNorm's running statistics as torch defines them: after 5 updates they equal the plain
PyTorch loop's within 1e-5, with a momentum and with ``momentum=None`` (the cumulative
average, whose factor 1 / num_batches_tracked torch computes on the host: on jax it is traced
data). neuron-xla runs the same cases in tests/xla/test_xla_batchnorm.py.
"""

from __future__ import annotations

import pytest
import torch

from stateful_layers import BN_STEPS, bn_batches, bn_step, plain_bn_run, statistics, statistics_error
from support import requires

BACKENDS = ["cpu", pytest.param("jax:cpu", marks=requires("jax", "torchax", "optax"))]
MOMENTA = [pytest.param(0.1, id="momentum=0.1"), pytest.param(None, id="momentum=None")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", MOMENTA)
def test_running_statistics_equal_the_plain_loop(backend, momentum):
    want = statistics(plain_bn_run(momentum))
    step = bn_step(momentum, backend)
    for b in bn_batches():
        step(b)
    assert statistics_error(statistics(step.model), want) <= 1e-5
    assert int(step.model.state_dict()["1.num_batches_tracked"]) == BN_STEPS
    # The layers are the user's again afterwards: momentum as they set it.
    assert all(m.momentum == momentum for m in step.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    if backend.startswith("jax"):
        assert step.engine.compiles == 1  # the cumulative factor is an input, not a constant


def test_the_comparison_sees_a_wrong_factor():
    """The tolerance tells torch's cumulative average from a fixed momentum of 0.1."""
    assert statistics_error(statistics(plain_bn_run(0.1)), statistics(plain_bn_run(None))) > 1e-2
