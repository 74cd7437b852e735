"""The random stream is training state: ``torch.manual_seed`` governs dropout on every backend,
and ``ac.save`` / ``ac.load`` carry each backend's generator (torch's CPU generator on ``cpu``,
the step's PRNG key on ``jax:cpu``), so a resumed run draws exactly the masks of the
uninterrupted one. neuron-xla runs the same cases in tests/xla/test_xla_rng.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anychip import checkpoint
from stateful_layers import DROPOUT, fresh_step, plain_dropout_run, resumed, run, same_weights, saved_midway
from support import requires

JAX = pytest.param("jax:cpu", marks=requires("jax", "torchax", "optax"))
BACKENDS = ["cpu", JAX]
CASES = ["nn.Dropout", pytest.param("gpt2", marks=requires("transformers"))]


@pytest.fixture(autouse=True)
def _keep_torch_rng():
    """These tests seed torch and ac.load restores saved generators: leave the process as found."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_random_stream_is_training_state(tmp_path, backend, case):
    """Save at update 4 and load into a fresh step built under another seed: updates 5..8 equal
    the uninterrupted run exactly. Two fresh runs under one seed are identical, two seeds
    differ. (Four compiled steps on jax:cpu: each case shares them between the claims.)"""
    case = DROPOUT[case]
    want_losses, want_weights = saved_midway(case, backend, 7, tmp_path)
    losses, final = resumed(case, backend, 1007, tmp_path)
    assert losses == want_losses[4:]
    assert same_weights(final, want_weights)
    assert run(case, backend, 7, steps=4)[0] == want_losses[:4]
    assert run(case, backend, 8, steps=4)[0] != want_losses[:4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_the_saved_stream_the_resume_differs(tmp_path, backend):
    """What makes the resume above equal is the restored generator, not the weights alone."""
    case = DROPOUT["nn.Dropout"]
    want_losses, _ = saved_midway(case, backend, 7, tmp_path)
    losses, _ = resumed(case, backend, 1007, tmp_path, restore_rng=False)
    assert losses != want_losses[4:]


@pytest.mark.parametrize("case", CASES)
def test_cpu_draws_the_masks_of_the_plain_loop(case):
    case = DROPOUT[case]
    assert run(case, "cpu", seed=7, steps=4)[0] == plain_dropout_run(case, seed=7, steps=4)


@requires("jax", "torchax", "optax")
def test_jax_key_is_saved_and_a_torch_checkpoint_gives_a_fresh_one(tmp_path):
    """The key is in the manifest (``rng.engine.jax_key``). A checkpoint written by a torch
    backend has none: the key then comes from torch's restored generator and the update number,
    so the resumed jax run neither replays a fresh run's masks nor depends on the resuming
    process's seed."""
    case = DROPOUT["nn.Dropout"]
    jax_step = fresh_step(case, "jax:cpu", 7)
    jax_step(case.batches(1)[0])
    path = checkpoint.save(jax_step, tmp_path / "jax")
    assert checkpoint.verify(path)["rng"]["engine"].keys() == {"jax_key"}

    cpu_step = fresh_step(case, "cpu", 7)
    for b in case.batches(4):
        cpu_step(b)
    checkpoint.save(cpu_step, tmp_path / "cpu")
    keys = []
    for seed in (7, 8):
        target = fresh_step(case, "jax:cpu", seed)
        fresh_key = target.state_dict()["rng"]["jax_key"]
        checkpoint.load(tmp_path / "cpu", target)
        keys.append(target.state_dict()["rng"]["jax_key"])
        assert not torch.equal(keys[-1], fresh_key)
    assert torch.equal(keys[0], keys[1])
    # restore_rng=False leaves the key where it was.
    target = fresh_step(case, "jax:cpu", 7)
    before = target.state_dict()["rng"]["jax_key"]
    checkpoint.load(tmp_path / "cpu", target, restore_rng=False)
    assert torch.equal(target.state_dict()["rng"]["jax_key"], before)


@requires("jax", "torchax", "optax")
def test_a_key_of_another_prng_implementation_is_refused_before_loading():
    case = DROPOUT["nn.Dropout"]
    step = fresh_step(case, "jax:cpu", 7)
    state = step.state_dict()
    before = state["model"]["0.weight"].clone()
    wrong = {**state, "model": {k: v + 1 for k, v in state["model"].items()}, "rng": {"jax_key": torch.zeros(16, dtype=torch.uint8)}}
    with pytest.raises(ValueError, match="saved JAX PRNG key has 16 bytes.*jax_default_prng_impl"):
        step.load_state_dict(wrong)
    assert torch.equal(step.state_dict()["model"]["0.weight"], before)
    assert np.asarray(state["rng"]["jax_key"]).dtype == np.uint8
