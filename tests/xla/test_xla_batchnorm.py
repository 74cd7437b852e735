"""BatchNorm on `neuron-xla` as torch defines it: the running variance is the unbiased one
(torch_xla's own update uses the biased one), and ``momentum=None`` (the cumulative average)
runs as one graph per step, compiled once, instead of a host read per layer and a new graph per
step. The statistics after 5 updates equal the plain PyTorch loop's within 1e-5, as on cpu and
jax:cpu (tests/test_batchnorm.py).
"""

from __future__ import annotations

import pytest
import torch

from stateful_layers import BN_STEPS, bn_batches, bn_step, plain_bn_run, statistics, statistics_error

MOMENTA = [pytest.param(0.1, id="momentum=0.1"), pytest.param(None, id="momentum=None")]


@pytest.mark.parametrize("momentum", MOMENTA)
def test_running_statistics_equal_the_plain_loop(momentum):
    want = statistics(plain_bn_run(momentum))
    step = bn_step(momentum, "neuron-xla")
    batches = bn_batches()
    step(batches[0])
    step(batches[1])  # steps 1 and 2 have graphs of their own (the optimizer state appears)
    step.synchronize()
    before = step.backend.graph_stats()
    for b in batches[2:]:
        step(b)
    step.synchronize()
    after = step.backend.graph_stats()
    assert statistics_error(statistics(step.model), want) <= 1e-5
    assert int(step.model.state_dict()["1.num_batches_tracked"]) == BN_STEPS
    assert all(m.momentum == momentum for m in step.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # The corrected update adds no graph: one execution per step, nothing compiled after step 2.
    assert after["compiles"] - before["compiles"] == 0
    assert after["executions"] - before["executions"] == BN_STEPS - 2


def test_eval_mode_leaves_the_statistics_and_uses_them():
    """Outside training the hooks do nothing: an eval forward on the device keeps the statistics
    and normalizes with them, as the same weights do on the CPU."""
    step = bn_step(None, "neuron-xla")
    for b in bn_batches(2):
        step(b)
    model = step.model.eval()
    kept = statistics(model)
    cpu = plain_bn_run(None).eval()
    cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    x = bn_batches(1)[0][0]
    with torch.no_grad():
        out = model(x.to(step.backend.device)).cpu()
    assert all(torch.equal(v, kept[k]) for k, v in statistics(model).items())
    torch.testing.assert_close(out, cpu(x), rtol=1e-5, atol=1e-5)
