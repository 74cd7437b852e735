"""Run under ``torchrun --nproc-per-node 2`` by test_checkpoint_sharded.py (CPU, gloo).

``matrix ROOT OUT``: an FSDP run saves update 3 (every rank its own shards), trains on to 6
and saves that asynchronously; then the update-3 checkpoint is resumed under FSDP and DDP, and
``ROOT/single`` (written by one process beforehand) under FSDP. Each rank writes what it saw
to ``OUT/rank-N.json``: losses, and which shard files its loads opened.

``kill ROOT OUT``: both ranks save update 1; at the save of update 2 rank 1 SIGKILLs itself
halfway through writing its shard file, and rank 0 reports the error its save raised.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import anychip as ac
from anychip import distributed
from anychip.checkpoint import shards
from torchrun_worker import batches, make_step

SAVE_AT, RESUMED = 3, 3  # save after 3 updates, compare the 3 after it


def opened_files(run) -> list[str]:
    """The shard files ``run()`` opened on this rank."""
    seen, real = [], shards.OpenFile.__init__

    def spy(self, directory, name, rec):
        seen.append(name)
        real(self, directory, name, rec)

    shards.OpenFile.__init__ = spy
    try:
        run()
    finally:
        shards.OpenFile.__init__ = real
    return sorted(set(seen))


def resume(parallel: str, path: str, at: int) -> dict:
    w, step = make_step("gpt-tiny", parallel)
    files = opened_files(lambda: ac.load(path, step, at=at))
    rng = rng_digest()
    return {"files": files, "rng": rng, "losses": [step(b).loss for b in batches(w, at, at + RESUMED)]}


def user_optimizer_round_trip(root: str) -> dict:
    """The script's own torch.optim AdamW (parameter groups) and LambdaLR under FSDP: saved by
    both ranks, resumed under FSDP on both."""
    from torchrun_worker import make_user_step

    w, step = make_user_step("adamw", "fsdp")
    for b in batches(w, 0, SAVE_AT):
        step(b)
    saved = ac.save(step, os.path.join(root, "user"))
    after = [step(b).loss for b in batches(w, SAVE_AT, SAVE_AT + RESUMED)]
    w, fresh = make_user_step("adamw", "fsdp")
    ac.load(saved, fresh)
    return {"saved": str(saved), "uninterrupted": after, "resumed": [fresh(b).loss for b in batches(w, SAVE_AT, SAVE_AT + RESUMED)]}


def rng_digest() -> str:
    import hashlib

    import torch

    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()


def matrix(root: str, out: str) -> None:
    import torch

    ac.init_distributed("cpu")
    w, step = make_step("gpt-tiny", "fsdp")
    for b in batches(w, 0, SAVE_AT):
        step(b)
    torch.rand(distributed.rank() + 1)  # the ranks' generators now differ, as dropout would leave them
    report = {"rng_at_save": rng_digest()}
    report["saved"] = str(ac.save(step, os.path.join(root, "fsdp")))
    report["uninterrupted"] = [step(b).loss for b in batches(w, SAVE_AT, SAVE_AT + RESUMED)]
    handle = ac.save(step, os.path.join(root, "fsdp"), asynchronous=True)
    report["next_loss_while_writing"] = step(batches(w, 6, 7)[0]).loss
    report["async_saved"] = str(handle.wait())
    # What the background write holds is the state of update 6: resumed, it gives the loss the
    # run itself took next, while the write was going on.
    report["async_resumed_first_loss"] = resume("fsdp", os.path.join(root, "fsdp"), 6)["losses"][0]
    report["fsdp"] = resume("fsdp", os.path.join(root, "fsdp"), SAVE_AT)
    report["rng_after_fsdp_resume"] = report["fsdp"].pop("rng")
    report["ddp"] = resume("ddp", os.path.join(root, "fsdp"), SAVE_AT)
    report["single_to_fsdp"] = resume("fsdp", os.path.join(root, "single"), SAVE_AT)
    report["user_optimizer"] = user_optimizer_round_trip(root)
    with open(os.path.join(out, f"rank-{distributed.rank()}.json"), "w") as fh:
        json.dump(report, fh)


def kill(root: str, out: str) -> None:
    ac.init_distributed("cpu")
    w, step = make_step("mlp", "fsdp")
    step(batches(w, 0, 1)[0])
    ac.save(step, root)
    step(batches(w, 1, 2)[0])
    if distributed.rank() == 1:
        real = shards.write_file

        def die_halfway(path, tensors):
            real(path, tensors[: max(1, len(tensors) // 2)])  # some of the file on disk
            os.kill(os.getpid(), signal.SIGKILL)

        shards.write_file = die_halfway
    started = time.monotonic()
    try:
        ac.save(step, root)
        report = {"error": None}
    except Exception as exc:  # noqa: BLE001 - reported for the test to judge
        report = {"error": type(exc).__name__, "message": str(exc)}
    report["seconds"] = time.monotonic() - started
    with open(os.path.join(out, f"rank-{distributed.rank()}.json"), "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    {"matrix": matrix, "kill": kill}[sys.argv[1]](*sys.argv[2:4])
