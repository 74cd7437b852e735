"""anychip.distributed without a launch: layout from the environment, the helpers' answers, and
bad values refused with one line (the multi-process behaviour is in test_torchrun.py and
test_jax_multiprocess.py)."""

from __future__ import annotations

import pytest

import anychip as ac
from anychip import distributed

from support import requires

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", distributed.TIMEOUT_ENV)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


def test_alone_init_distributed_is_a_no_op_and_this_is_the_main_process():
    lay = ac.init_distributed("cpu")
    assert (lay.engine, lay.world_size, lay.rank, lay.nodes) == (None, 1, 0, 1)
    assert ac.is_main_process() and "single process" in lay.describe()
    import torch.distributed as dist

    assert not dist.is_initialized()  # nothing was joined


def test_torchrun_variables_give_the_layout(monkeypatch):
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    lay = distributed.layout()
    assert (lay.engine, lay.world_size, lay.rank, lay.local_rank, lay.nodes, lay.coordinator) == ("torchrun", 8, 5, 1, 2, "node0:29500")
    assert not ac.is_main_process()
    assert lay.describe() == "torchrun: world size 8 (2 node(s) x 4), this is rank 5 (local rank 1), coordinator node0:29500"


def test_jax_variables_give_the_layout(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    lay = distributed.layout()
    assert (lay.engine, lay.world_size, lay.rank) == ("jax.distributed", 2, 0) and ac.is_main_process()


def test_bad_values_are_refused_with_the_variable_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ac.DistributedError, match=r"WORLD_SIZE='two' is not an integer"):
        distributed.layout()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "-3")
    with pytest.raises(ac.DistributedError, match=r"ANYCHIP_DIST_TIMEOUT='-3' must be a number of seconds > 0"):
        distributed.timeout_s()
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        ac.init_distributed("cpu", timeout=0)


def test_timeout_reaches_the_process_group(monkeypatch):
    import torch.distributed as dist

    seen = {}
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "300")  # restored afterwards: init_distributed sets it
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.update(backend=backend, timeout=timeout))
    ac.init_distributed("cpu", timeout=7)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 7


def test_alone_main_outcome_passes_the_message_through():
    assert distributed.main_outcome(None) is None and distributed.main_outcome("disk full") == "disk full"


@requires("jax", "torchax", "optax")
def test_a_jax_step_under_torchrun_without_jax_distributed_is_refused(monkeypatch):
    from anychip import workloads

    monkeypatch.setenv("WORLD_SIZE", "2")
    w = workloads.get("mlp")
    with pytest.raises(
        ac.DistributedError, match="torchrun started 2 processes but jax:cpu sees 1; jax backends join through jax.distributed"
    ):
        ac.TrainStep(w.build(), w.loss_fn, backend="jax:cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shutdown_without_a_group_is_a_no_op():
    ac.shutdown_distributed()
    ac.shutdown_distributed()


def test_a_group_anychip_created_is_left_once(monkeypatch):
    import torch.distributed as dist

    env = {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ac.init_distributed("cpu")
    assert dist.is_initialized()
    ac.shutdown_distributed()
    assert not dist.is_initialized()
    ac.shutdown_distributed()  # idempotent: the second call (and the one at exit) finds nothing to do


def test_a_group_the_script_created_is_left_to_the_script():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ac.init_distributed("cpu")  # joins nothing: a group is up
        ac.shutdown_distributed()
        assert dist.is_initialized()  # the script owns its teardown
    finally:
        dist.destroy_process_group()
