"""The random stream on `neuron-xla`: torch.manual_seed governs torch_xla's generator (seeded from
torch's when the step is built; torch's seeding does not reach it), and ``ac.save`` / ``ac.load``
carry it, so a resumed run draws the uninterrupted run's masks. The same cases as
tests/test_rng_state.py runs on cpu and jax:cpu.
"""

from __future__ import annotations

import pytest
import torch

from anychip import checkpoint
from stateful_layers import DROPOUT, fresh_step, resumed, run, same_weights, saved_midway
from support import requires

BACKEND = "neuron-xla"
CASES = ["nn.Dropout", pytest.param("gpt2", marks=requires("transformers"))]


@pytest.fixture(autouse=True)
def _keep_torch_rng():
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.mark.parametrize("case", CASES)
def test_random_stream_is_training_state(tmp_path, case):
    """Save at update 4 and load into a fresh step built under another seed: updates 5..8 equal
    the uninterrupted run exactly; one seed twice in one process gives one run, two seeds two."""
    case = DROPOUT[case]
    want_losses, want_weights = saved_midway(case, BACKEND, 7, tmp_path)
    losses, final = resumed(case, BACKEND, 1007, tmp_path)
    assert losses == want_losses[4:]
    assert same_weights(final, want_weights)
    assert run(case, BACKEND, 7, steps=4)[0] == want_losses[:4]
    assert run(case, BACKEND, 8, steps=4)[0] != want_losses[:4]


def test_without_the_saved_stream_the_resume_differs(tmp_path):
    case = DROPOUT["nn.Dropout"]
    want_losses, _ = saved_midway(case, BACKEND, 7, tmp_path)
    losses, _ = resumed(case, BACKEND, 1007, tmp_path, restore_rng=False)
    assert losses != want_losses[4:]


def test_a_checkpoint_without_an_xla_generator_seeds_it_from_torch(tmp_path):
    """A cpu checkpoint has no XLA generator state: loading it seeds the generator from torch's
    restored one, the same whichever seed the resuming process had, and not the seed a fresh
    step starts from (which would replay a fresh neuron-xla run's masks)."""
    case = DROPOUT["nn.Dropout"]
    saved_midway(case, "cpu", 7, tmp_path)
    seeds = []
    for seed in (1007, 2007):
        step = fresh_step(case, BACKEND, seed)
        fresh = step.backend.rng_state()["xla"]
        checkpoint.load(tmp_path, step)
        seeds.append(step.backend.rng_state()["xla"])
        assert seeds[-1] != fresh
    assert seeds[0] == seeds[1]
