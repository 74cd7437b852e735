"""One writer per checkpoint directory, and the refusals that name what is wrong.

Concurrent writers (processes and threads) must never leave a ``step-*`` directory without its
complete contents; the only failure a second writer may see is :class:`CheckpointBusyError`.
A lock left by a killed process must not block the next save. Bad inputs and a full disk get
an anychip error that names the problem instead of a raw ``OSError`` / ``KeyError``.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from anychip import checkpoint
from anychip.checkpoint import CheckpointError, CheckpointMismatchError
from support import requires, resign_manifest

pytestmark = requires("safetensors")

SAVES = 40
PRELOAD = ["torch", "torch._dynamo", "torch.optim", "safetensors.torch", "anychip", "anychip.checkpoint", "anychip.workloads"]


def step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("step-"))


def assert_every_checkpoint_complete(root: Path) -> None:
    dirs = step_dirs(root)
    assert dirs, f"no checkpoint left in {root}: {sorted(p.name for p in root.iterdir())}"
    for d in dirs:
        checkpoint.verify(d)  # manifest, every file, every checksum
    assert [p.name for p in checkpoint.checkpoints(root)] == [p.name for p in dirs]


def busy_error():
    """The class under test, looked up late: without it the tests fail on the behaviour they
    check (no refusal at all), not on a missing name at import."""
    return getattr(checkpoint, "CheckpointBusyError", CheckpointError)


# -- two writers -----------------------------------------------------------------------------------


def test_two_writer_processes_leave_only_complete_checkpoints(tmp_path):
    import checkpoint_writer as cw

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    root, go = tmp_path / "ckpt", tmp_path / "go"
    logs = [tmp_path / f"writer-{i}.log" for i in range(2)]
    procs = [
        ctx.Process(target=cw.save_many, args=(str(root), str(log), 1000 * (i + 1), SAVES, str(go)), daemon=True)
        for i, log in enumerate(logs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60
    while not all(log.exists() and log.read_text().startswith("ready") for log in logs):
        assert time.monotonic() < deadline and all(p.is_alive() for p in procs), "writers did not start"
        time.sleep(0.01)
    go.touch()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"writer ended with {p.exitcode}"
    outcomes = {p.pid: log.read_text().splitlines()[1:] for p, log in zip(procs, logs)}
    errors = [line for lines in outcomes.values() for line in lines if line.startswith("error")]
    assert not errors, errors
    for pid, lines in outcomes.items():
        assert sum(line.startswith("saved") for line in lines) == SAVES, lines[-3:]
        others = [str(q) for q in outcomes if q != pid]
        for line in lines:
            if line.startswith("busy"):  # names the process that holds the directory
                assert any(f"pid {q}" in line for q in others), line
    refusals = sum(line.startswith("busy") for lines in outcomes.values() for line in lines)
    assert refusals, "the writers never overlapped, so the lock was not exercised"
    assert_every_checkpoint_complete(root)
    assert len(step_dirs(root)) == cw.KEEP_LAST
    assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_two_writer_threads_leave_only_complete_checkpoints(tmp_path):
    import checkpoint_writer as cw

    root, failures, start = tmp_path / "ckpt", [], threading.Barrier(2)
    steps = [cw.make_step() for _ in range(2)]

    def writer(step, first):
        state = step.state_dict()
        start.wait()
        for n in range(first, first + SAVES):
            step.load_state_dict({**state, "step": n})
            try:
                checkpoint.save(step, root, keep_last=cw.KEEP_LAST)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(exc)

    threads = [threading.Thread(target=writer, args=(s, 1000 * (i + 1))) for i, s in enumerate(steps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [f"{type(e).__name__}: {e}" for e in failures if type(e).__name__ != "CheckpointBusyError"]
    assert_every_checkpoint_complete(root)
    assert len(step_dirs(root)) == cw.KEEP_LAST


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_lock_holder_is_named_and_its_death_frees_the_directory(tmp_path):
    import checkpoint_writer as cw

    root = tmp_path / "ckpt"
    root.mkdir()
    step = cw.make_step()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(busy_error(), match=f"pid {holder.pid}"):
            checkpoint.save(step, root)
        assert step_dirs(root) == []
        os.kill(holder.pid, signal.SIGKILL)  # the OS drops a dead process's flock
        holder.wait(10)
    finally:
        holder.kill()
        holder.wait()
    saved = checkpoint.save(step, root, keep_last=1)
    assert (root / ".lock").exists()
    # The lock file is neither a checkpoint nor a leftover for listing, rotation, verify or load.
    assert checkpoint.checkpoints(root) == [saved]
    step.load_state_dict({**step.state_dict(), "step": 1})
    second = checkpoint.save(step, root, keep_last=1)
    assert checkpoint.checkpoints(root) == [second]
    assert checkpoint.verify(root)["step"] == 1
    assert checkpoint.load(root, cw.make_step(), restore_rng=False).step == 1


# -- a checkpoint without one of its optimizer's slots ----------------------------------------------


def drop_slot(ckpt: Path, slot: str, only: str | None = None) -> None:
    """Rewrite ``ckpt``'s manifest without optimizer slot ``slot`` (or without it for parameter
    ``only``), as if it had never been saved, its checksum recomputed: damage no checksum can
    catch, only the fit check."""

    def edit(m):
        listing = m["optimizer_state"]["slots"]
        names = list(listing[slot]) if only is None else [only]
        if only is None:
            del listing[slot]
        else:
            del listing[slot][only]
        for record in m["files"].values():
            for name in names:
                record["tensors"].pop(f"optimizer/{slot}/{name}", None)

    resign_manifest(ckpt / "manifest.json", edit)


@pytest.mark.parametrize("only", [None, "2.weight"])
def test_a_missing_optimizer_slot_is_refused_before_the_step_changes(tmp_path, only):
    import checkpoint_writer as cw

    writer = cw.make_step()
    for i in range(2):
        writer(cw.batch(i))
    ckpt = checkpoint.save(writer, tmp_path)
    names = list(json.loads((ckpt / "manifest.json").read_text())["optimizer_state"]["slots"]["exp_avg_sq"])
    assert only is None or only in names, names
    drop_slot(ckpt, "exp_avg_sq", only)
    target = cw.make_step()
    with pytest.raises(CheckpointMismatchError, match="exp_avg_sq"):
        checkpoint.load(tmp_path, target, restore_rng=False)
    assert target.step_count == 0
    target(cw.batch(0))  # the step still trains


# -- refusals with a reason ------------------------------------------------------------------------


def test_a_full_disk_names_the_directory_and_the_room_needed(tmp_path, monkeypatch):
    import checkpoint_writer as cw
    from anychip.checkpoint import durable

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durable, "write_durable", full)
    root = tmp_path / "ckpt"
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(cw.make_step(), root, keep_last=2)
    message = str(info.value)
    for fragment in (str(root), "bytes", "free", "keep_last=2", "3 checkpoints"):
        assert fragment in message, message
    assert "\n" not in message
    assert step_dirs(root) == []
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_saving_to_a_regular_file_is_a_checkpoint_error(tmp_path):
    import checkpoint_writer as cw

    target = tmp_path / "ckpt"
    target.write_bytes(b"not a directory")
    with pytest.raises(CheckpointError, match="not a directory") as info:
        checkpoint.save(cw.make_step(), target)
    assert not isinstance(info.value, FileExistsError)
    assert target.read_bytes() == b"not a directory"


@pytest.mark.parametrize("at", ["abc", "3", 2.0, True])
def test_load_at_must_be_an_update_number(tmp_path, at):
    import checkpoint_writer as cw

    step = cw.make_step()
    checkpoint.save(step, tmp_path)
    with pytest.raises(TypeError, match="at must be an int") as info:
        checkpoint.load(tmp_path, cw.make_step(), at=at)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="at must be"):
        checkpoint.load(tmp_path, cw.make_step(), at=-1)


def test_a_model_instead_of_the_train_step_is_a_type_error(tmp_path):
    import checkpoint_writer as cw

    step = cw.make_step()
    checkpoint.save(step, tmp_path / "ok")
    with pytest.raises(TypeError, match="TrainStep"):
        checkpoint.save(step.model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(TypeError, match="TrainStep"):
        checkpoint.load(tmp_path / "ok", step.model)
