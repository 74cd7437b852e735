"""The writer lock under torchrun: rank 0 alone locks the directory and writes, and every rank
learns rank 0's outcome. While another process holds the lock, both ranks of a 2-process job
get CheckpointBusyError naming the holder and nothing is written; once the holder lets go,
both ranks' save succeeds and leaves one complete checkpoint (one torchrun launch, CPU/gloo)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import anychip as ac
from anychip import checkpoint, workloads
from anychip.checkpoint.layout import LOCK_NAME
import support
from support import requires

pytestmark = requires("safetensors")

WORKER = pathlib.Path(__file__).parent / "checkpoint_torchrun_worker.py"

# Holds the lock as a live writer does (pid in the file), and lets go as one does (file emptied,
# descriptor closed) when RELEASE appears, then says so with RELEASED and stays alive.
HOLD_LOCK = """
import fcntl, os, sys, time
lock, release, released = sys.argv[1:4]
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.005)
os.ftruncate(fd, 0)
os.close(fd)
open(released, "w").close()
time.sleep(60)
"""


def test_both_ranks_are_refused_while_the_lock_is_held_then_both_save(tmp_path):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    release, released = tmp_path / "release", tmp_path / "released"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root / LOCK_NAME), str(release), str(released)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        done, _ = support.torchrun(WORKER, str(root), str(out), str(release), str(released), timeout_s=120)
        assert done.returncode == 0, done.stderr[-4000:]
    finally:
        holder.kill()
        holder.wait()
    reports = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]

    for r in reports:
        assert r["busy"]["error"] == "CheckpointBusyError", r
        assert f"pid {holder.pid}" in r["busy"]["message"], r
    assert not [n for n in reports[0]["listing_while_held"] if n.startswith("step-")], reports[0]["listing_while_held"]

    saved = root / "step-000000001"
    assert [r["free"] for r in reports] == [{"saved": str(saved)}] * 2
    assert checkpoint.checkpoints(root) == [saved]
    assert checkpoint.verify(saved)["step"] == 1  # manifest, every file, every checksum
    w = workloads.get("mlp")
    fresh = ac.TrainStep(w.build(seed=1), w.loss_fn, ac.SGD(lr=0.1), backend="cpu")
    ac.load(root, fresh, restore_rng=False)
    checksum = float(sum(v.double().sum() for v in fresh.state_dict()["model"].values()))
    assert reports[0]["checksum"] == reports[1]["checksum"] == checksum
