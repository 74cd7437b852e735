"""Data parallel and FSDP on 8 fake CPU devices, run as its own process.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts, and the pytest
process may already have started JAX with one device; so ``tests/test_jax_parallel.py`` runs
this file with ``python`` and reads the JSON it prints on its last line.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402

import anychip as ac  # noqa: E402
from anychip import workloads  # noqa: E402
from anychip.backends.jax import probe  # noqa: E402
from anychip.backends.jax.backend import JaxBackend  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo: str) -> dict[str, int]:
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def run(name, backend, parallel, accumulate, steps=3, batch=16, seq=16):
    w = workloads.get(name)
    step = ac.TrainStep(
        w.build(seed=0), w.loss_fn, ac.AdamW(lr=3e-3, weight_decay=0.1), backend=backend,
        parallel=parallel, accumulate=accumulate, max_grad_norm=0.5,
    )
    data = [w.batch(i, batch, seq) for i in range(steps)]
    losses = [step(b).loss for b in data]
    return step, losses, data


def main() -> None:
    devices = jax.devices("cpu")
    assert len(devices) == 8, devices
    all8 = JaxBackend(probe("jax:cpu"))
    one = JaxBackend(probe("jax:cpu"), devices=devices[:1])
    report = {"devices": len(all8.devices)}
    for name, accumulate in (("gpt-tiny", 1), ("mlp", 2)):
        single, base, _ = run(name, one, None, accumulate)
        dp, dp_losses, data = run(name, all8, None, accumulate)
        fsdp, fsdp_losses, _ = run(name, all8, "fsdp", accumulate)
        engine = fsdp.engine
        shards = {
            n: [list(p.shape), list(p.addressable_shards[0].data.shape), str(p.sharding.spec)]
            for n, p in engine.params.items()
        }
        slot_shards = {n: list(v.addressable_shards[0].data.shape) for n, v in engine.opt_state.exp_avg.items()}
        batch_sharding = str(all8.place_batch(data[0], accumulate)[0].sharding.spec)
        # state comes back to the host whole, and matches the single-device run
        sd_fsdp, sd_single = fsdp.state_dict(), single.state_dict()
        state_diff = max(
            float((sd_fsdp["model"][k].float() - sd_single["model"][k].float()).abs().max()) for k in sd_single["model"]
        )
        report[name] = {
            "accumulate": accumulate,
            "single": base,
            "dp": dp_losses,
            "fsdp": fsdp_losses,
            "dp_params": sorted({str(p.sharding.spec) for p in dp.engine.params.values()}),
            "dp_batch_sharding": batch_sharding,
            "fsdp_shards": shards,
            "fsdp_slot_shards": slot_shards,
            "fsdp_state_max_abs_diff": state_diff,
            "dp_hlo": collectives(dp.engine.lower(data[0]).compile().as_text()),
            "fsdp_hlo": collectives(engine.lower(data[0]).compile().as_text()),
            "compiles": [single.engine.compiles, dp.engine.compiles, engine.compiles],
        }
    # a batch that does not split over 8 devices: refused when data parallelism was asked for
    w = workloads.get("mlp")
    strict = ac.TrainStep(w.build(seed=0), w.loss_fn, backend=all8, parallel="ddp")
    try:
        strict(w.batch(0, 12, 1))
        report["ddp_indivisible"] = "no error"
    except ValueError as exc:
        report["ddp_indivisible"] = str(exc)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
