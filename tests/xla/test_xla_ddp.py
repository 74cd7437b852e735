"""``parallel="ddp"`` on neuron-xla: the xla process group (``xla://``), DDP over lazy tensors
and the lazy non-finite masking together, under torchrun with one process; and with two
processes on PJRT's CPU client, which cannot join processes, a clear refusal instead of two
ranks silently training alone."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import anychip as ac
from anychip import workloads

WORKER = pathlib.Path(__file__).parent / "ddp_worker.py"


def torchrun(nproc: int) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(ANYCHIP_DIST_TIMEOUT="60", PJRT_DEVICE="CPU")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(WORKER)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_ddp_under_torchrun_equals_the_single_process_step():
    done = torchrun(1)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    w = workloads.get("mlp")
    ref = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-3), backend="neuron-xla", max_grad_norm=1.0)
    want = [ref(w.batch(i, 8, 1, 0)).loss for i in range(3)]
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(got, want)) and len(got) == 3, (got, want)


def test_two_processes_the_pjrt_cpu_client_cannot_join_are_refused():
    done = torchrun(2)
    assert done.returncode != 0
    assert "torchrun started 2 processes but the 'neuron-xla' process group has world size 1" in done.stderr, done.stderr[-3000:]
