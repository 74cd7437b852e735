"""TrainStep on `jax:cpu` against the same step written by hand in JAX + optax, same run.

Both train the built-in MLP (32-128-128-10, GELU, cross-entropy) with AdamW from the same
initial weights on the same batches. The hand-written step is what a JAX user writes: a
jitted ``value_and_grad`` + ``optax.adamw`` with donated buffers. Both read back whether the
loss is finite after every step (anychip's default ``on_nonfinite="raise"`` does; a careful
hand-written loop does too), so the ratio measures what anychip adds: torchax tracing is paid
once at compile time, leaving the per-step batch conversion and Python bookkeeping.

    pytest -q benchmarks/bench_jax_step.py --benchmark-only
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("jax")
pytest.importorskip("torchax")
pytest.importorskip("optax")

import anychip as ac  # noqa: E402
from anychip import workloads  # noqa: E402
from anychip.bench.baseline import plain_jax_mlp_step  # noqa: E402

STEPS = 20  # steps per timed round
BATCH = 256
LR = 1e-3


def test_trainstep_jax_cpu_vs_plain_jax(benchmark):
    w = workloads.get("mlp")
    batches = [w.batch(i, BATCH, 1) for i in range(STEPS)]
    baseline = plain_jax_mlp_step(w.build(seed=0), lr=LR)  # the MLP and AdamW written directly in JAX/optax
    ours = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=LR), backend="jax:cpu")
    # same math: the first losses agree (optax.adamw differs from torch's order only in rounding)
    first = [float(baseline(b)) for b in batches[:2]], [ours(b).loss for b in batches[:2]]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    baseline_rounds = []

    def baseline_round():  # runs untimed before each timed round: the two alternate under equal load
        t0 = time.perf_counter()
        for b in batches:
            baseline(b)
        baseline_rounds.append((time.perf_counter() - t0) / STEPS)

    def run():
        for b in batches:
            ours(b)

    benchmark.pedantic(run, setup=baseline_round, rounds=10, iterations=1, warmup_rounds=1)
    base, mine = min(baseline_rounds), benchmark.stats.stats.min / STEPS
    ratio = mine / base
    benchmark.extra_info.update(
        {
            "baseline": "plain JAX + optax, jitted, donated",
            "baseline_s_per_step": base,
            "anychip_s_per_step": mine,
            "ratio": ratio,
            "batch": BATCH,
        }
    )
    print(f"\njax:cpu TrainStep {mine * 1e6:.0f} us/step, plain JAX {base * 1e6:.0f} us/step, ratio {ratio:.2f}")
    # Measured 1.06 on a shared 2-core machine. The bound is loose because CI machines are noisy;
    # it still catches a per-step retrace or a host round trip of the parameters (>= 3x here).
    assert ratio < 2.0, ratio
