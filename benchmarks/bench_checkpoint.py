"""Checkpoint throughput on GPT-2 small (124 M parameters) with AdamW state, ~1.5 GB: anychip
against the plain PyTorch way of writing the same tensors, in one process.

- save:  ``ac.save(step, dir)`` vs ``torch.save(state, file)`` + ``os.sync()``: both durable.
- async: the time ``ac.save(..., asynchronous=True)`` blocks the caller (the snapshot copy),
  against the synchronous ``ac.save``.
- load:  ``ac.load(dir, step)`` (every byte read verified against its SHA-256, then applied to
  the step) vs ``torch.load(file)`` + SHA-256 of the same bytes.

The sides are timed interleaved, round after round, and compared by their medians (the
filesystem's own speed varies 2x between rounds here). Old rounds' files are removed outside
the timed part, so every save writes to a fresh directory, as a training run's saves do.
Run: make bench   (or: pytest benchmarks/bench_checkpoint.py --benchmark-only -s)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import anychip as ac
from anychip import workloads

ROUNDS = int(os.environ.get("ANYCHIP_BENCH_ROUNDS", "5"))
MAX_SAVE_RATIO, MAX_ASYNC_SHARE, MAX_LOAD_RATIO = 1.2, 0.2, 1.2


def gpt2_small_with_adamw():
    w = workloads.get("gpt-small")
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=1e-4, weight_decay=0.1), backend="cpu")
    step(w.batch(0, 1, 16, 0))  # one update: AdamW's two moments now exist
    return w, step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_save(state, path: Path) -> None:
    torch.save(state, path)
    os.sync()


def torch_load_and_hash(path: Path) -> None:
    torch.load(path, weights_only=True)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(64 << 20):
            h.update(chunk)


def test_checkpoint_throughput_vs_torch_save(benchmark):
    w, step = gpt2_small_with_adamw()
    target = gpt2_small_with_adamw()[1]
    state = step.state_dict()
    nbytes = sum(t.numel() * t.element_size() for part in (state["model"], *state["optimizer"]["slots"].values()) for t in part.values())
    root = Path(tempfile.mkdtemp(prefix="anychip-bench-ckpt-", dir=os.environ.get("ANYCHIP_BENCH_DIR")))
    times = {k: [] for k in ("torch_save", "ac_save", "ac_async_blocked", "torch_load_hash", "ac_load")}
    try:
        for r in range(ROUNDS + 1):  # round 0 warms up (page cache, allocator, first-call paths)
            for old in root.iterdir():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            os.sync()
            t = {
                "torch_save": timed(lambda: torch_save(state, root / "state.pt")),
                "ac_save": timed(lambda: ac.save(step, root / "sync")),
            }
            handle = None

            def start_async():
                nonlocal handle
                handle = ac.save(step, root / "async", asynchronous=True)

            t["ac_async_blocked"] = timed(start_async)
            handle.wait()
            t["torch_load_hash"] = timed(lambda: torch_load_and_hash(root / "state.pt"))
            t["ac_load"] = timed(lambda: ac.load(root / "sync", target, restore_rng=False))
            if r:
                for k, v in t.items():
                    times[k].append(v)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    save_ratio = med["ac_save"] / med["torch_save"]
    async_share = med["ac_async_blocked"] / med["ac_save"]
    load_ratio = med["ac_load"] / med["torch_load_hash"]
    benchmark.extra_info.update(
        gigabytes=nbytes / 1e9, rounds=ROUNDS, **{f"{k}_s": v for k, v in times.items()},
        save_ratio=save_ratio, async_blocked_share=async_share, load_ratio=load_ratio,
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{nbytes / 1e9:.2f} GB, medians of {ROUNDS} rounds: torch.save+sync {med['torch_save']:.2f} s, ac.save {med['ac_save']:.2f} s "
          f"(ratio {save_ratio:.2f}); async blocks {med['ac_async_blocked']:.2f} s ({async_share:.0%} of the sync save); "
          f"torch.load+sha256 {med['torch_load_hash']:.2f} s, ac.load {med['ac_load']:.2f} s (ratio {load_ratio:.2f})")
    for k, v in times.items():
        print(f"  {k}: " + " ".join(f"{x:.2f}" for x in v))
    assert save_ratio <= MAX_SAVE_RATIO, f"ac.save is {save_ratio:.2f}x torch.save + os.sync (limit {MAX_SAVE_RATIO})"
    assert async_share <= MAX_ASYNC_SHARE, f"an asynchronous save blocks {async_share:.0%} of the synchronous save (limit 20%)"
    assert load_ratio <= MAX_LOAD_RATIO, f"ac.load is {load_ratio:.2f}x torch.load + hashing (limit {MAX_LOAD_RATIO})"
