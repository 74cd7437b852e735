"""The TrainStep conformance suite (tests/conformance) on `tpu`, where a TPU is: the same tests
`cpu`, `jax:cpu` and `neuron-xla` pass, run in a process of their own with float32 matmuls in
float32 (fp32_matmuls.py). Without a TPU there is nothing to run it on, and the probe's reason
says why."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from anychip.backends.torch import tpu

SUITE = pathlib.Path(__file__).resolve().parents[1] / "conformance"


def test_the_conformance_suite_passes_on_tpu():
    avail = tpu.probe()
    if not avail.available:
        pytest.skip(f"tpu is unavailable here: {avail.reason}")
    here = str(pathlib.Path(__file__).parent)
    env = {**os.environ, "ANYCHIP_TEST_BACKENDS": "tpu", "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fp32_matmuls", "-p", "no:cacheprovider", str(SUITE)],
                          env=env, timeout=3600)
    assert done.returncode == 0, "the conformance suite failed on tpu (its output is above)"
