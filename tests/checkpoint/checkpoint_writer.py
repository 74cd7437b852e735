"""The processes the checkpoint tests start: the writer test_checkpoint_faults.py kills (it trains
and checkpoints in a loop), and the racing writers of test_checkpoint_writers.py.

The killed writer resumes from the newest checkpoint in ``root`` (as a restarted job would),
then trains one update and saves, again and again; in its asynchronous mode it logs each
update's :func:`state_digest` and leaves the save writing in the background while it trains on.
Every durability-relevant system call of the save (each fsync, rename, unlink, rmdir) is logged
to ``log_path`` as a phase label first, optionally slowed down (so that a kill after a random
delay lands inside a save), and optionally turned into ``SIGKILL`` of this very process at the
n-th occurrence of a chosen label (so that every phase is hit for certain). The hooks live here,
in the test's process only; anychip itself has no test switches.
"""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import time

import torch

import anychip as ac
from anychip import checkpoint, workloads

WORKLOAD = "mlp"
BATCH = 16
KEEP_LAST = 2


def make_step():
    """The training job, identical in the writer and in the test that checks its checkpoints."""
    w = workloads.get(WORKLOAD)
    spec = ac.AdamW(lr=3e-3, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=3, total=500))
    return ac.TrainStep(w.build(seed=0), w.loss_fn, spec, backend="cpu", max_grad_norm=1.0)


def batch(n: int):
    return workloads.get(WORKLOAD).batch(n, BATCH, 1, 0)


def state_digest(step) -> str:
    """SHA-256 over every model tensor and optimizer slot tensor of ``step`` in sorted key order
    (each key, dtype and shape, then its raw bytes): the writer logs it per update, and the test
    recomputes it from what it loads, so a checkpoint is matched to the update it claims to be."""
    state = step.state_dict()
    tensors = {f"model/{k}": v for k, v in state["model"].items()}
    tensors.update({f"optimizer/{slot}/{k}": v for slot, d in state["optimizer"]["slots"].items() for k, v in d.items()})
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _where(path: str, root: str) -> str:
    """A phase label's object: 'root', 'tmp-dir', 'trash-dir' or a file name inside a checkpoint."""
    path = os.path.realpath(path)
    base, parent = os.path.basename(path), os.path.basename(os.path.dirname(path))
    if path == root:
        return "root"
    if base.startswith(".tmp-"):
        return "tmp-dir"
    if base.startswith(".trash-"):
        return "trash-dir"
    return base if parent.startswith((".tmp-", "step-")) else path


def _dir_kind(path: str) -> str:
    return "tmp" if "/.tmp-" in path else "trash" if "/.trash-" in path else "other"


def install_hooks(root: str, log_fd: int, kill_on: tuple[str, int] | None, delay_s: float) -> None:
    # An asynchronous save calls these from its own thread while the main thread logs too: each
    # label is one os.write of a whole line to an O_APPEND descriptor, so lines never interleave.
    root = os.path.realpath(root)
    counts: collections.Counter = collections.Counter()

    def phase(label: str) -> None:
        counts[label] += 1
        os.write(log_fd, f"{label}\n".encode())
        if kill_on is not None and label == kill_on[0] and counts[label] == kill_on[1]:
            os.kill(os.getpid(), signal.SIGKILL)
        if delay_s:
            time.sleep(delay_s)

    real_fsync, real_rename, real_unlink, real_rmdir = os.fsync, os.rename, os.unlink, os.rmdir

    def fsync(fd):
        phase("fsync:" + _where(os.readlink(f"/proc/self/fd/{fd}"), root))
        return real_fsync(fd)

    def rename(src, dst, **kw):
        kinds = tuple("tmp" if b.startswith(".tmp-") else "trash" if b.startswith(".trash-") else "step"
                      for b in (os.path.basename(str(src)), os.path.basename(str(dst))))
        phase(f"rename:{kinds[0]}->{kinds[1]}")
        return real_rename(src, dst, **kw)

    def unlink(path, *, dir_fd=None):
        where = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.path.dirname(str(path))
        phase("unlink:" + _dir_kind(where + "/"))
        return real_unlink(path, dir_fd=dir_fd)

    def rmdir(path, *, dir_fd=None):
        where = os.readlink(f"/proc/self/fd/{dir_fd}") + "/" + str(path) if dir_fd is not None else str(path)
        phase("rmdir:" + _dir_kind(where))
        return real_rmdir(path, dir_fd=dir_fd)

    os.fsync, os.rename, os.unlink, os.rmdir = fsync, rename, unlink, rmdir


def write_forever(root: str, log_path: str, kill_on=None, delay_s: float = 0.0, max_saves: int | None = None,
                  asynchronous: bool = False) -> None:
    """Resume from ``root``, then train one update and save it, forever (or ``max_saves`` times).

    ``asynchronous=True`` logs ``checksum N <state_digest>`` after update N, starts its save
    without waiting (``started N``) and trains the next update meanwhile; the next save waits
    for it by itself, so a kill often lands in the background write, training or not."""
    torch.set_num_threads(1)  # the same reduction order as the checking process
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        step = make_step()
        try:
            checkpoint.load(root, step)
        except checkpoint.CheckpointNotFoundError:
            pass
        os.write(log_fd, f"ready {step.step_count}\n".encode())
        install_hooks(root, log_fd, tuple(kill_on) if kill_on else None, delay_s)
        saves, handle = 0, None
        while max_saves is None or saves < max_saves:
            step(batch(step.step_count))
            if asynchronous:
                os.write(log_fd, f"checksum {step.step_count} {state_digest(step)}\n".encode())
                handle = checkpoint.save(step, root, keep_last=KEEP_LAST, extra={"pid": os.getpid()}, asynchronous=True)
                os.write(log_fd, f"started {step.step_count}\n".encode())
            else:
                checkpoint.save(step, root, keep_last=KEEP_LAST, extra={"pid": os.getpid()})
                os.write(log_fd, f"saved {step.step_count}\n".encode())
            saves += 1
        if handle is not None:
            handle.wait()
            os.write(log_fd, f"saved {handle.step}\n".encode())
    except BaseException as exc:
        os.write(log_fd, f"error {type(exc).__name__}: {exc}\n".encode())
        raise


def save_many(root: str, log_path: str, first_update: int, saves: int, go_path: str) -> None:
    """One of several writers racing into ``root``: saves with keep_last until ``saves`` of its
    own updates (from ``first_update`` on, so no two writers ever save the same update) are in,
    trying again shortly after each refusal. Each attempt's outcome is a log line: ``saved N``,
    ``busy MESSAGE`` or ``error TYPE: MESSAGE`` (which ends the writer)."""
    torch.set_num_threads(1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    step = make_step()
    state = step.state_dict()
    os.write(log_fd, b"ready\n")
    while not os.path.exists(go_path):  # every writer starts at once, so their saves overlap
        time.sleep(0.001)
    n, done, deadline = first_update, 0, time.monotonic() + 60
    while done < saves and time.monotonic() < deadline:
        # A new update number without training: what is raced here is the save, not the step.
        step.load_state_dict({**state, "step": n})
        n += 1
        try:
            checkpoint.save(step, root, keep_last=KEEP_LAST)
        except Exception as exc:  # noqa: BLE001 - every failure is logged for the test to judge
            if type(exc).__name__ != "CheckpointBusyError":
                os.write(log_fd, f"error {type(exc).__name__}: {exc}\n".encode())
                return
            os.write(log_fd, f"busy {exc}\n".encode())
            time.sleep(0.005)
            continue
        done += 1
        os.write(log_fd, f"saved {n - 1}\n".encode())
