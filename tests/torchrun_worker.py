"""Run under ``torchrun --nproc-per-node 2`` by tests/test_torchrun.py.

``train OUT CKPT``: every case of :data:`CASES` with ``parallel=`` on the ``cpu`` backend
(gloo), plus a checkpoint written from an FSDP run and resumed in the same run; rank 0 writes
what it saw to OUT as JSON. ``kill`` / ``hang``: rank 1 dies (SIGKILL) or stops answering
before step 4, and rank 0 reports how its own step failed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import anychip as ac
from anychip import distributed, workloads

STEPS, BATCH = 3, 8
# (name, workload, parallel, accumulate, split_batches, each rank builds its model from seed rank)
CASES = [
    ("mlp-ddp", "mlp", "ddp", 1, True, True),
    ("mlp-fsdp-acc2", "mlp", "fsdp", 2, True, False),
    ("mlp-ddp-local-batches", "mlp", "ddp", 2, False, False),
    ("gpt-tiny-ddp-acc2", "gpt-tiny", "ddp", 2, True, False),
    ("gpt-tiny-fsdp", "gpt-tiny", "fsdp", 1, True, True),
]


# The user's own torch.optim optimizer + LR scheduler: (name, recipe, parallel); "auto" must pick DDP here.
USER_CASES = [
    ("adamw-groups-lambdalr-ddp", "adamw", "ddp"),
    ("adamw-groups-lambdalr-fsdp", "adamw", "fsdp"),
    ("sgd-nesterov-onecycle-ddp", "sgd", "ddp"),
    ("sgd-nesterov-onecycle-fsdp", "sgd", "fsdp"),
    ("adamw-groups-lambdalr-auto", "adamw", "auto"),
]


def user_optimizer(recipe: str, model):
    """What a plain torch script builds: AdamW with a no-decay group + warm-up, or SGD + 1cycle."""
    import torch

    if recipe == "adamw":
        groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=3e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS + 1)


def make_user_step(recipe: str, parallel):
    w = workloads.get("mlp")
    model = w.build(seed=0)
    opt, sched = user_optimizer(recipe, model)
    return w, ac.TrainStep(model, w.loss_fn, opt, lr_scheduler=sched, backend="cpu", parallel=parallel)


def make_step(workload: str, parallel, accumulate: int = 1, split_batches: bool = True, seed: int = 0):
    w = workloads.get(workload)
    model = w.build(seed=seed)
    opt = ac.AdamW(lr=3e-3, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=1, total=10))
    step = ac.TrainStep(model, w.loss_fn, opt, backend="cpu", max_grad_norm=0.5, accumulate=accumulate,
                        parallel=parallel, split_batches=split_batches)
    return w, step


def batches(w, start: int, stop: int):
    return [w.batch(i, BATCH, w.default_seq, 0) for i in range(start, stop)]


def local_part(batch):
    """This rank's rows of a global batch: what a DistributedSampler would have handed it."""
    from anychip.batch import split_batch

    return split_batch(batch, distributed.world_size())[distributed.rank()]


def train(out: str, ckpt: str) -> None:
    lay = ac.init_distributed("cpu")
    report = {"layout": lay.as_dict(), "is_main": [], "cases": {}}
    for name, workload, parallel, accumulate, split, seed_by_rank in CASES:
        # Different initial weights per rank: both wrappers must start every rank from rank 0's.
        w, step = make_step(workload, parallel, accumulate, split, seed=distributed.rank() if seed_by_rank else 0)
        outs = [step(b if split else local_part(b)) for b in batches(w, 0, STEPS)]
        state = step.state_dict()
        report["cases"][name] = {
            "losses": [o.loss for o in outs],
            "grad_norms": [o.grad_norm for o in outs],
            "tokens": [o.tokens for o in outs],
            "checksum": float(sum(v.double().sum() for v in state["model"].values())),
            "param_types": sorted({type(p).__name__ for p in step.engine.params}),
        }
    report["user_optimizer"] = {}
    for name, recipe, parallel in USER_CASES:
        w, step = make_user_step(recipe, parallel)
        outs = [step(b) for b in batches(w, 0, STEPS)]
        state = step.state_dict()
        report["user_optimizer"][name] = {
            "parallel": step.spec.parallel,
            "losses": [o.loss for o in outs],
            "lrs": [list(o.lrs) for o in outs],
            "checksum": float(sum(v.double().sum() for v in state["model"].values())),
            "slots": float(sum(t.double().sum() for by_name in state["optimizer"]["slots"].values() for t in by_name.values())),
            "param_types": sorted({type(p).__name__ for g in step.engine.optimizer.param_groups for p in g["params"]}),
        }
    # A global batch that 2 ranks x accumulate 2 cannot split: refused before any work.
    w, step = make_step("mlp", "ddp", 2)
    try:
        step(w.batch(0, 6, 1, 0))
        report["indivisible"] = None
    except ValueError as exc:
        report["indivisible"] = str(exc)
    # Portable checkpoint from sharded state: save after 2 updates, go on for 2 more, then
    # resume a fresh FSDP step from the files (the test resumes it on one process too).
    w, step = make_step("gpt-tiny", "fsdp")
    for b in batches(w, 0, 2):
        step(b)
    saved = ac.save(step, ckpt)
    report["saved"] = str(saved)
    report["after_save"] = [step(b).loss for b in batches(w, 2, 4)]
    w, fresh = make_step("gpt-tiny", "fsdp")
    ac.load(saved, fresh)
    report["resumed"] = [fresh(b).loss for b in batches(w, 2, 4)]
    report["is_main"] = ac.is_main_process()
    if ac.is_main_process():
        with open(out, "w") as fh:
            json.dump(report, fh)


def fail(how: str) -> None:
    w, step = make_step("mlp", "ddp")
    for i in range(20):
        if i == 3 and distributed.rank() == 1:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)  # "hang": alive, but never joins the next collective
        step(w.batch(i, BATCH, 1, 0)).loss


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2], sys.argv[3])
    else:
        fail(sys.argv[1])
