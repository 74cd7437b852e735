"""A torchrun job whose ranks finish training exits 0, every time, without a teardown in the
script: anychip created the process group, so it leaves it at exit. Without that, gloo's threads
can outlive a peer that already exited and the process dies of SIGABRT ("terminate called
without an active exception") after training finished, so torchrun reports the job failed.

A rank that leaves without the teardown makes the other's teardown fail within the
distributed timeout, with a one-line reason and a non-zero exit, not a hang.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

import anychip as ac

WORKER = pathlib.Path(__file__).parent / "torchrun_exit_worker.py"
# Each launch costs ~9 s on 2 cores (torchrun and two ranks importing torch): make test runs 10;
# ANYCHIP_EXIT_LAUNCHES=30 is the full check (30 of 30 exited 0; 1 of 30 aborted before the teardown).
LAUNCHES = int(os.environ.get("ANYCHIP_EXIT_LAUNCHES", "10"))


def torchrun(mode: str, env_extra: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    root = str(pathlib.Path(ac.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("ANYCHIP_BACKEND", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # One intra-op thread per rank: two ranks on a small CI machine, and the model is tiny.
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), mode]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_a_job_that_trains_and_ends_exits_0_every_time():
    failed = []
    for _ in range(LAUNCHES):
        done = torchrun("ends")
        if done.returncode != 0:
            failed.append(done.stderr[-1500:])
    assert not failed, f"{len(failed)} of {LAUNCHES} launches failed; the first:\n{failed[0]}"


def test_a_rank_gone_before_the_teardown_fails_it_fast_with_one_line():
    start = time.perf_counter()
    done = torchrun("leave-early", env_extra={ac.distributed.TIMEOUT_ENV: "3"})
    seconds = time.perf_counter() - start
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "leaving the process group" in line]
    assert len(lines) == 1 and "rank 0/2" in lines[0] and "timeout 3 s, set by ANYCHIP_DIST_TIMEOUT" in lines[0], done.stderr[-3000:]
    assert seconds < 40, seconds  # start-up + 3 steps + the 3 s timeout, not a hang
