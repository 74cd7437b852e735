"""One training step of each small built-in workload on every available backend, next to the
same step written by hand in plain PyTorch on the CPU (the baseline of
anychip.bench.baseline, timed in the same run).

pytest-benchmark groups the results by workload; every backend's entry carries
``extra_info["vs_plain_torch"]``: its median step time over the baseline's (below 1 = faster
than plain PyTorch on this CPU). ``anychip bench`` is the tool for cross-backend numbers with
MFU, memory and cost; this file is the quick regression guard that runs under pytest.
Run: pytest benchmarks/bench_workloads.py --benchmark-only [--benchmark-json out.json]
"""

from __future__ import annotations

import functools
import statistics
import time

import pytest

import anychip as ac
from anychip import workloads
from anychip.backends import backends
from anychip.bench.baseline import plain_torch_step

WORKLOADS = ("mlp", "gpt-tiny")
BACKENDS = tuple(a.name for a in backends() if a.available)
ROUNDS, WARMUP = 20, 3


def _optimizer():
    return ac.AdamW(lr=1e-3, weight_decay=0.1)


def _median_step(fn, batch, rounds: int = ROUNDS) -> float:
    for _ in range(WARMUP):
        fn(batch)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def _baseline_median(workload: str) -> float:
    w = workloads.get(workload)
    step = plain_torch_step(w.build(seed=0), w.loss_fn, _optimizer(), max_grad_norm=1.0)
    return _median_step(step, w.batch(0, w.default_batch, w.default_seq, 0))


@pytest.mark.parametrize("workload", WORKLOADS)
def test_plain_torch_baseline(benchmark, workload):
    w = workloads.get(workload)
    step = plain_torch_step(w.build(seed=0), w.loss_fn, _optimizer(), max_grad_norm=1.0)
    batch = w.batch(0, w.default_batch, w.default_seq, 0)
    benchmark.group = workload
    benchmark.pedantic(step, args=(batch,), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_trainstep(benchmark, workload, backend):
    w = workloads.get(workload)
    be = ac.backend(backend)
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, _optimizer(), backend=be, precision="fp32", max_grad_norm=1.0)
    batch = w.batch(0, w.default_batch, w.default_seq, 0)

    def one(b):
        out = step(b)
        step.synchronize()  # time the work, not the queueing
        return out

    ours = _median_step(one, batch)
    base = _baseline_median(workload)
    benchmark.group = workload
    benchmark.extra_info.update(backend=backend, device_kind=be.device_kind, vs_plain_torch=ours / base)
    benchmark.pedantic(one, args=(batch,), rounds=ROUNDS, warmup_rounds=0, iterations=1)
