"""Data parallel and FSDP over 8 fake CPU devices (tests/backends/jax_multidevice/parallel_check.py,
run in its own process because XLA fixes the device count when JAX starts)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from support import requires

pytestmark = requires("jax", "torchax", "optax")

SCRIPT = pathlib.Path(__file__).parent / "jax_multidevice" / "parallel_check.py"
# The same math in another summation order: 8 partial sums instead of one.
LOSS_RTOL = 2e-6


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ANYCHIP_BACKEND")}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def close(a, b):
    return all(abs(x - y) <= LOSS_RTOL * abs(y) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.parametrize("name", ["gpt-tiny", "mlp"])
def test_data_parallel_and_fsdp_losses_equal_the_single_device_run(report, name):
    r = report[name]
    assert report["devices"] == 8
    assert close(r["dp"], r["single"]), r
    assert close(r["fsdp"], r["single"]), r
    assert r["fsdp_state_max_abs_diff"] < 1e-4  # state_dict() gathers the shards back whole
    assert r["compiles"] == [1, 1, 1]


@pytest.mark.parametrize("name", ["gpt-tiny", "mlp"])
def test_data_parallel_replicates_params_splits_the_batch_and_all_reduces(report, name):
    r = report[name]
    assert r["dp_params"] == ["P()"]
    assert r["dp_batch_sharding"] == ("P('data',)" if r["accumulate"] == 1 else "P(None, 'data')")
    assert r["dp_hlo"]["all-reduce"] > 0, r["dp_hlo"]


@pytest.mark.parametrize("name", ["gpt-tiny", "mlp"])
def test_fsdp_shards_params_and_optimizer_state_and_gathers_them(report, name):
    r = report[name]
    for param, (full, shard, spec) in r["fsdp_shards"].items():
        split = [i for i, (f, s) in enumerate(zip(full, shard)) if f != s]
        if spec == "P()":  # only when no dimension divides by 8
            assert all(d % 8 for d in full), (param, full)
        else:
            assert len(split) == 1 and shard[split[0]] * 8 == full[split[0]], (param, full, shard)
            assert full[split[0]] == max(d for d in full if d % 8 == 0)  # the largest divisible dim
        assert r["fsdp_slot_shards"][param] == shard  # AdamW moments sharded like the parameter
    hlo = r["fsdp_hlo"]
    assert hlo["all-gather"] > 0, hlo
    # Gradients are summed across devices into sharded results. GPU/TPU compilers emit that as
    # reduce-scatter; XLA:CPU has no reduce-scatter-creator pass and keeps all-reduce + slice.
    assert hlo["reduce-scatter"] + hlo["all-reduce"] > 0, hlo


def test_ddp_refuses_a_batch_that_does_not_split(report):
    assert "does not split over 8 devices" in report["ddp_indivisible"]
