"""Training with the fused kernels tracks training with the plain-PyTorch reference model."""

from __future__ import annotations

import pytest

import anychip as ac
from anychip import workloads
from support import requires

BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("jax:cpu", id="jax-cpu", marks=requires("jax", "torchax", "optax")),
    pytest.param("cuda", id="cuda", marks=requires("cuda")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["llama-tiny", "gpt-tiny"])
def test_kernels_on_vs_reference_20_steps(backend, name):
    w = workloads.get(name)
    losses = {}
    for mode in ("auto", "reference"):
        step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=3e-3, schedule=ac.WarmupCosine(2, 20)),
                            backend=backend, kernels=mode, max_grad_norm=1.0, compile=False)
        losses[mode] = [step(w.batch(i, 8, 64)).loss for i in range(20)]
    # fp32 everywhere; the fused head sums in chunks, the Triton kernels in their own order
    assert losses["auto"] == pytest.approx(losses["reference"], rel=1e-4)
    assert losses["auto"][-1] < losses["auto"][0] - 0.5
