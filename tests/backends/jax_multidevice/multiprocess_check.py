"""Training across two processes under ``jax.distributed``, or the single-device reference.

``tests/test_jax_multiprocess.py`` starts this file three times, each in its own process
(XLA fixes the device count when JAX starts):

    python multiprocess_check.py OUT reference   one process, one CPU device
    python multiprocess_check.py OUT worker      twice, with JAX_COORDINATOR_ADDRESS,
                                                 JAX_NUM_PROCESSES=2 and JAX_PROCESS_ID set

Each runs every case of ``CASES`` in turn (one pair of processes for all of them: a launch
costs more than a case) and writes ``OUT/<role>.json`` with losses, gradient norms and facts,
and ``OUT/<role>-<case>.pt`` with the final ``state_dict()``. The workers get the batches as a
torchrun user passes them: the global batch (``split_batches=True``) or their own part of it.
"""

from __future__ import annotations

import os
import sys

PROCESSES, DEVICES_PER_PROCESS = 2, 2
STEPS = 3
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 3e-3, 0.1, 0.5

# name: (workload, parallel, accumulate, split_batches, global batch, extras)
# extras: "seed": process 1 builds its model from another seed (process 0's weights must win);
# "nan": a non-finite batch after the last step, skipped everywhere (on_nonfinite="skip");
# "reload": the state before the last step is loaded back (load_state_dict) and the last step
# run again, which must repeat it exactly (the same compiled program: no extra compile).
CASES = {
    "mlp-ddp": ("mlp", "ddp", 1, True, 16, ("seed", "nan")),
    "mlp-fsdp-parts-acc2": ("mlp", "fsdp", 2, False, 16, ("reload",)),
    "gpt-ddp-acc2": ("gpt-tiny", "ddp", 2, True, 8, ()),
    "gpt-fsdp-parts": ("gpt-tiny", "fsdp", 1, False, 8, ("reload",)),
}
SEQ = 16


def union(parts: list, accumulate: int):
    """The global batch the processes' parts form: micro-batch ``i`` of the global step is the
    parts' micro-batches ``i`` side by side, so the single-device reference is fed that order."""
    import torch
    from torch.utils import _pytree as pytree

    from anychip.batch import split_batch

    micro = [split_batch(p, accumulate) for p in parts]  # [process][micro]
    ordered = [m[i] for i in range(accumulate) for m in micro]
    return pytree.tree_map(lambda *xs: torch.cat(xs), *ordered)


def poisoned(batch):
    """The batch with NaN in every float leaf (the mlp's inputs)."""
    import torch
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda t: torch.full_like(t, float("nan")) if t.is_floating_point() else t, batch)


def run_case(name: str, out: str, role: str) -> dict:
    import torch

    import anychip as ac
    from anychip import distributed, workloads
    from anychip.batch import split_batch

    workload, parallel, accumulate, split_batches, size, extras = CASES[name]
    w = workloads.get(workload)
    reference = role == "reference"
    rank, world = (0, 1) if reference else (distributed.rank(), distributed.world_size())

    def make(seed=0):
        return ac.TrainStep(
            w.build(seed=seed), w.loss_fn, ac.AdamW(lr=LR, weight_decay=WEIGHT_DECAY), backend="jax:cpu",
            parallel=None if reference else parallel, accumulate=accumulate, max_grad_norm=MAX_GRAD_NORM,
            split_batches=split_batches, on_nonfinite="skip" if "nan" in extras else "raise",
        )

    def feed(batch):
        """What this process passes to step(): the global batch, its own part, or (reference)
        the global batch in the order the parts form it."""
        if split_batches:
            return batch
        if reference:
            return union(split_batch(batch, PROCESSES), accumulate)
        return split_batch(batch, world)[rank]

    step = make(seed=1 if "seed" in extras and rank == 1 else 0)
    first = feed(w.batch(0, size, SEQ))
    outputs = []
    for i in range(STEPS):
        if "reload" in extras and i == STEPS - 1:
            before_last = step.state_dict()
        outputs.append(step(feed(w.batch(i, size, SEQ))))
    report = {
        "placed_batch": placed_digest(step, first),
        "losses": [o.loss for o in outputs],
        "grad_norms": [o.grad_norm for o in outputs],
        "tokens": [o.tokens for o in outputs],
    }
    if "reload" in extras:
        step.load_state_dict(before_last)
        again = step(feed(w.batch(STEPS - 1, size, SEQ)))
        report["reloaded_last_step"] = {"loss": again.loss, "grad_norm": again.grad_norm, "step_count": step.step_count}
    if "nan" in extras:
        bad = step(feed(poisoned(w.batch(STEPS, size, SEQ))))
        report["nan_step"] = {"skipped": bad.skipped, "step_count": step.step_count}
    state = step.state_dict()  # every process: sharded parameters are gathered collectively
    torch.save(state, os.path.join(out, f"{role}-{name}.pt"))
    # engine.model is the torch module refreshed from the devices: the same weights
    report["model_matches_state"] = all(torch.equal(v, state["model"][k]) for k, v in step.model.state_dict().items())
    if not reference:
        engine = step.engine
        report["param_specs"] = sorted({str(p.sharding.spec) for p in engine.params.values()})
        report["params_span_processes"] = any(not p.is_fully_addressable for p in engine.params.values())
        report["batch_too_small"] = batch_error(step, w, accumulate, split_batches)
    return report


def placed_digest(step, batch) -> list[str]:
    """Shape and sha256 of every leaf of ``batch`` as the step places it, gathered whole: the
    global batch the step trains on (a duplicated or misordered one has the same mean loss)."""
    import hashlib

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    spec = step.engine.spec
    placed = step.engine.backend.place_batch(batch, spec.accumulate, strict=True, split_batches=spec.split_batches)
    digests = []
    for leaf in jax.tree.leaves(placed):
        whole = np.ascontiguousarray(multihost_utils.process_allgather(leaf, tiled=True))
        digests.append(f"{tuple(whole.shape)} {hashlib.sha256(whole.tobytes()).hexdigest()}")
    return digests


def batch_error(step, w, accumulate: int, split_batches: bool) -> str:
    """The error for a batch that does not split over the devices (raised before any
    collective, so both processes raise it and neither waits)."""
    size = 3 * accumulate if not split_batches else 2 * accumulate  # 3 rows / 2 local devices; 2 / 4 devices
    try:
        step(w.batch(0, size, SEQ))
    except ValueError as exc:
        return str(exc)
    return "no error"


def facts() -> dict:
    """How the run looks from this process: the mesh, the layout, the device facts."""
    import anychip as ac
    from anychip import distributed

    be = ac.backend("jax:cpu")
    lay = distributed.layout()
    be.synchronize()
    outcome = distributed.main_outcome("rank 0 says so" if distributed.is_main_process() else None)
    distributed.barrier()
    return {
        "devices": be.device_count,
        "local_devices": len(be.local_devices),
        "devices_in_use": be.devices_in_use,
        "processes": be.processes,
        "layout": lay.as_dict(),
        "is_main_process": distributed.is_main_process(),
        "main_outcome": outcome,
        "memory_source": be.memory_stats().source,
        "peak_flops": be.peak_flops("fp32"),
    }


def main() -> None:
    out, role = sys.argv[1], sys.argv[2]
    if role == "worker":
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
        role = f"worker-{os.environ['JAX_PROCESS_ID']}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import json

    import anychip as ac

    ac.init_distributed("jax:cpu")  # a no-op for the reference (no JAX_COORDINATOR_ADDRESS)
    report = {"facts": facts(), "cases": {name: run_case(name, out, role) for name in CASES}}
    with open(os.path.join(out, f"{role}.json"), "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main()
