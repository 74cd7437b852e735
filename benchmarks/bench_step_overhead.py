"""TrainStep's own cost: a tiny MLP step through anychip vs the same step written by hand
(anychip.bench.baseline.plain_torch_step).

Both sides do the same work (forward, backward, clip_grad_norm_, AdamW, schedule); the step
is small on purpose so that any per-step Python overhead of TrainStep shows. The two loops
are timed interleaved, round after round, and compared by their fastest rounds (as timeit
advises: on a shared 2-core machine the slower rounds measure the neighbours, and the
median's run-to-run spread, about 5%, was as large as the effect).
Run: make bench   (or: pytest benchmarks/bench_step_overhead.py --benchmark-only)
"""

from __future__ import annotations

import statistics
import time

import anychip as ac
from anychip import workloads
from anychip.bench.baseline import plain_torch_step

ROUNDS, STEPS = 41, 40
MAX_RATIO = 1.05


def _time(fn, batch) -> float:
    start = time.perf_counter()
    for _ in range(STEPS):
        fn(batch)
    return (time.perf_counter() - start) / STEPS


def test_trainstep_overhead_vs_hand_written(benchmark):
    w = workloads.get("mlp")
    spec = ac.AdamW(lr=1e-3, weight_decay=0.1, schedule=ac.WarmupCosine(10, 10_000))
    batch = w.batch(0, 64)
    ours = ac.TrainStep(w.build(seed=0), w.loss_fn, spec, backend="cpu", max_grad_norm=1.0)
    theirs = plain_torch_step(w.build(seed=0), w.loss_fn, spec, max_grad_norm=1.0)
    for fn in (ours, theirs):  # warm-up: allocator, first-call paths
        _time(fn, batch)
    t_ours, t_theirs = [], []
    for _ in range(ROUNDS):
        t_ours.append(_time(ours, batch))
        t_theirs.append(_time(theirs, batch))
    ratio = min(t_ours) / min(t_theirs)
    benchmark.extra_info.update(
        anychip_step_us=min(t_ours) * 1e6,
        hand_written_step_us=min(t_theirs) * 1e6,
        median_ratio=statistics.median(t_ours) / statistics.median(t_theirs),
        ratio=ratio,
    )
    benchmark.pedantic(ours, args=(batch,), rounds=50, iterations=5)
    print(f"\nTrainStep {min(t_ours) * 1e6:.1f} us vs hand-written {min(t_theirs) * 1e6:.1f} us (fastest rounds): ratio {ratio:.3f}")
    assert ratio <= MAX_RATIO, f"TrainStep is {ratio:.3f}x the hand-written step (limit {MAX_RATIO})"
