"""Run under ``torchrun --nproc-per-node 2`` by test_checkpoint_torchrun.py: both ranks save
while another process holds the directory's writer lock, then again once it has let go.

``ROOT OUT RELEASE RELEASED``: each rank trains one DDP update and calls ``ac.save`` (the lock
holder refuses it), rank 0 lists ``ROOT``, creates ``RELEASE`` (the holder's cue to unlock) and
waits for ``RELEASED``; then both ranks save again. Each rank writes what it saw to
``OUT/rank-N.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import anychip as ac
from anychip import distributed, workloads


def attempt(step, root: str) -> dict:
    try:
        return {"saved": str(ac.save(step, root))}
    except Exception as exc:  # noqa: BLE001 - every outcome is reported for the test to judge
        return {"error": type(exc).__name__, "message": str(exc)}


def main(root: str, out: str, release: str, released: str) -> None:
    ac.init_distributed("cpu")
    w = workloads.get("mlp")
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.SGD(lr=0.1), backend="cpu", parallel="ddp")
    step(w.batch(0, 8, 1, 0))
    report = {"rank": distributed.rank(), "busy": attempt(step, root)}
    if distributed.is_main_process():
        report["listing_while_held"] = sorted(os.listdir(root))
        open(release, "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(released) and time.monotonic() < deadline:
            time.sleep(0.005)
    # Rank 1 goes straight on: save's first collective waits for rank 0.
    report["free"] = attempt(step, root)
    report["checksum"] = float(sum(v.double().sum() for v in step.state_dict()["model"].values()))
    with open(os.path.join(out, f"rank-{distributed.rank()}.json"), "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main(*sys.argv[1:5])
