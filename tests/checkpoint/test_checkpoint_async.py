"""Asynchronous saves (``ac.save(..., asynchronous=True)``) and the bad input of a save.

The background write is held at a gate (a test hook on the shard writer) so that what the
caller can do meanwhile is tested for certain, not by racing a fast disk.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import anychip as ac
from anychip import checkpoint
from anychip.checkpoint import CheckpointError, SaveHandle, shards
from anychip.errors import InvalidArgumentError
from format1_model import batch, make_step
from support import requires

pytestmark = requires("safetensors")


def weights(step) -> dict:
    return {k: v.clone() for k, v in step.state_dict()["model"].items()}


@pytest.fixture
def gate(monkeypatch):
    """Holds every shard file write until ``gate.set()``; ``gate.entered`` once one is waiting."""
    real, opened, entered = shards.write_file, threading.Event(), threading.Event()

    def held(path, tensors):
        entered.set()
        assert opened.wait(30), "the test never opened the gate"
        return real(path, tensors)

    monkeypatch.setattr(shards, "write_file", held)
    opened.entered = entered
    yield opened
    opened.set()


def test_returns_at_once_and_writes_the_state_of_that_moment(tmp_path, gate):
    step = make_step()
    step(batch(0))
    at_save = weights(step)
    handle = checkpoint.save(step, tmp_path, asynchronous=True)
    assert isinstance(handle, SaveHandle) and not handle.done()
    assert gate.entered.wait(30)
    for i in range(1, 4):  # training goes on while the write is held
        step(batch(i))
    assert not handle.done() and checkpoint.checkpoints(tmp_path) == []
    gate.set()
    assert handle.wait(30) == tmp_path / "step-000000001" and handle.done()
    resumed = make_step()
    assert checkpoint.load(tmp_path, resumed, restore_rng=False).step == 1
    assert all(torch.equal(v, at_save[k]) for k, v in weights(resumed).items())  # not the later weights


def test_a_second_save_waits_for_the_first(tmp_path, gate):
    step = make_step()
    step(batch(0))
    first = checkpoint.save(step, tmp_path, asynchronous=True)
    step(batch(1))
    second: list = []
    t = threading.Thread(target=lambda: second.append(checkpoint.save(step, tmp_path, asynchronous=True)))
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and not first.done(), "the second save must wait while the first is writing"
    gate.set()
    t.join(30)
    assert first.wait(30).name == "step-000000001" and second[0].wait(30).name == "step-000000002"
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-000000001", "step-000000002"]


def test_the_same_update_twice_is_refused_once_the_first_is_written(tmp_path, gate):
    step = make_step()
    step(batch(0))
    first = checkpoint.save(step, tmp_path, asynchronous=True)
    gate.set()
    with pytest.raises(checkpoint.CheckpointExistsError, match="never overwritten"):
        checkpoint.save(step, tmp_path, asynchronous=True)
    assert first.wait(30).name == "step-000000001"
    checkpoint.verify(tmp_path / "step-000000001")


def failing_write(monkeypatch, err: int):
    def broken(path, tensors):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(shards, "write_file", broken)


def test_a_failed_background_write_is_raised_by_wait_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    step = make_step()
    step(batch(0))
    checkpoint.save(step, tmp_path)
    step(batch(1))
    failing_write(monkeypatch, errno.EIO)
    handle = checkpoint.save(step, tmp_path, asynchronous=True)
    with pytest.raises(CheckpointError, match="Input/output error"):
        handle.wait(30)
    monkeypatch.undo()
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-000000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    checkpoint.save(step, tmp_path)  # told once: the next save goes ahead
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-000000001", "step-000000002"]


def test_a_failure_nobody_waited_for_is_raised_by_the_next_save(tmp_path, monkeypatch, caplog):
    step = make_step()
    step(batch(0))
    failing_write(monkeypatch, errno.EIO)
    handle = checkpoint.save(step, tmp_path, asynchronous=True)
    while not handle.done():
        time.sleep(0.01)
    monkeypatch.undo()
    step(batch(1))
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(step, tmp_path)
    message = str(info.value)
    assert "previous asynchronous save (update 1" in message and "Input/output error" in message and "\n" not in message
    assert checkpoint.checkpoints(tmp_path) == []
    assert checkpoint.save(step, tmp_path).name == "step-000000002"


EXIT_SCRIPT = """
import logging, sys, time
sys.path.insert(0, sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(message)s")
import anychip as ac
from anychip.checkpoint import shards
from format1_model import batch, make_step
real = shards.write_file
def slow(path, tensors):
    time.sleep(1.0)  # still writing when the script ends
    return real(path, tensors)
shards.write_file = slow
step = make_step()
step(batch(0))
ac.save(step, sys.argv[1], asynchronous=True)
print("returned", flush=True)
"""


def test_at_exit_an_unfinished_save_is_waited_for_with_a_log_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "returned"
    assert "waiting for the asynchronous save of update 1" in done.stderr and "to finish before exiting" in done.stderr
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-000000001"]
    checkpoint.verify(tmp_path / "step-000000001")


# -- bad input: one line, nothing written, nothing lost ------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, None, "True"])
def test_asynchronous_must_be_a_bool(tmp_path, value):
    step = make_step()
    with pytest.raises(InvalidArgumentError) as info:
        checkpoint.save(step, tmp_path / "ckpt", asynchronous=value)
    assert "asynchronous must be True or False" in str(info.value) and repr(value) in str(info.value)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("where", ["directory", "shard", "manifest"])
@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
def test_a_read_only_or_full_filesystem_is_one_clear_error(tmp_path, monkeypatch, where, err, asynchronous):
    """The file system refusing at each place a save writes: the directory, a rank's shard
    file, the manifest. (Simulated: as root, permissions cannot make a directory read-only, and
    a real full or read-only mount needs privileges CI may not have.)"""
    from anychip.checkpoint import durable

    step = make_step()
    step(batch(0))
    root = tmp_path / "ckpt"
    checkpoint.save(step, root)
    before = sorted(p.name for p in root.iterdir())
    step(batch(1))

    def refuse(*a, **k):
        raise OSError(err, os.strerror(err))

    target = {"directory": (durable, "start"), "shard": (shards, "write_file"), "manifest": (durable, "write_durable")}[where]
    monkeypatch.setattr(*target, refuse)
    with pytest.raises(CheckpointError) as info:
        out = checkpoint.save(step, root, asynchronous=asynchronous)
        if asynchronous:
            out.wait(30)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and str(root) in message, message
    if err == errno.ENOSPC:
        assert "no space left" in message and "bytes" in message, message
    else:
        assert "read-only" in message.lower() and "writable" in message, message
    assert sorted(p.name for p in root.iterdir()) == before  # the earlier checkpoint, nothing else
    checkpoint.verify(root / "step-000000001")


@requires("jax", "torchax")
def test_a_jax_step_saves_asynchronously_after_its_device_to_host_copy(tmp_path):
    from anychip import workloads

    w = workloads.get("mlp")
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-2), backend="jax:cpu")
    step(w.batch(0, 8, 1, 0))
    at_save = weights(step)
    handle = checkpoint.save(step, tmp_path, asynchronous=True)
    step(w.batch(1, 8, 1, 0))  # trains on while the copy is written
    assert handle.wait(60).name == "step-000000001"
    for backend in ("jax:cpu", "cpu"):
        resumed = ac.TrainStep(w.build(seed=1), w.loss_fn, ac.AdamW(lr=1e-2), backend=backend)
        checkpoint.load(tmp_path, resumed, restore_rng=False)
        assert all(torch.equal(v, at_save[k]) for k, v in weights(resumed).items()), backend


def test_asynchronous_under_several_jax_processes_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from anychip import distributed

    step = make_step()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # jax.distributed: processes, but no torch group
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(step, tmp_path / "ckpt", asynchronous=True)
    assert "under jax.distributed is not supported: save synchronously there" in str(info.value)
    assert not (tmp_path / "ckpt").exists()
