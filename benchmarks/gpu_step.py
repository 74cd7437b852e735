"""TrainStep on `cuda` vs the hand-written loop a careful user writes, in one process.

    python benchmarks/gpu_step.py OUT.json [--workload gpt-small] [--batch 16 --seq 1024]
                                  [--steps 50 --warmup 10] [--kernels auto|reference]

Both sides run the same model, data and work: ``torch.compile`` of forward+loss, bf16
autocast, ``clip_grad_norm_(1.0)``, fused AdamW with a schedule. Each side is timed over
``--steps`` steps after ``--warmup`` (compile) steps, with a device synchronisation around the
timed region; rounds alternate (hand, anychip, hand, anychip) and the median round is kept.
Prints a table and writes JSON; ratio = anychip tokens/s over hand-written tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

import anychip as ac
from anychip import workloads
from anychip.backends.facts.peaks import peak_flops
from anychip.bench.baseline import plain_torch_step


def hand_written(model, loss_fn, spec):
    """The reference loop, exactly what a user writes without anychip: torch.compile of
    forward+loss on the reference ops (plain PyTorch), bf16 autocast, clipping, fused AdamW,
    the schedule, and a pinned asynchronous copy of every batch."""
    return plain_torch_step(model, loss_fn, spec, device="cuda", precision="bf16", compile=True, max_grad_norm=1.0,
                            fused=True, pin_memory=True, reference_kernels=True)


def timed(step, data, warmup: int, steps: int) -> tuple[float, float]:
    """(compile + warm-up seconds, steady seconds per step)."""
    start = time.perf_counter()
    for i in range(warmup):
        step(data[i % len(data)])
    torch.cuda.synchronize()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
        step(data[i % len(data)])
    torch.cuda.synchronize()
    return warm, (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--workload", default="gpt-small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kernels", default="reference", choices=("auto", "reference"))
    args = p.parse_args(argv)

    w = workloads.get(args.workload)
    spec = ac.AdamW(lr=3e-4, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=10, total=10_000))
    data = [w.batch(i, args.batch, args.seq) for i in range(8)]
    tokens = args.batch * args.seq
    peak = peak_flops(torch.cuda.get_device_name(), "bf16")
    flops = w.flops_per_token(w.build(seed=0), args.seq)

    def make(which):
        model = w.build(seed=0)
        if which == "hand-written":
            return hand_written(model, w.loss_fn, spec)
        return ac.TrainStep(model, w.loss_fn, spec, backend="cuda", precision="bf16", max_grad_norm=1.0, kernels=args.kernels)

    results = {"hand-written": [], "anychip": []}
    for _ in range(args.rounds):
        for which in results:
            torch.cuda.reset_peak_memory_stats()
            step = make(which)
            warm, per_step = timed(step, data, args.warmup, args.steps)
            results[which].append({"warmup_s": warm, "step_s": per_step, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9})
            del step
            gc.collect()
            torch.cuda.empty_cache()

    rows = {}
    for which, runs in results.items():
        median = sorted(runs, key=lambda r: r["step_s"])[len(runs) // 2]
        tps = tokens / median["step_s"]
        rows[which] = {**median, "tokens_per_s": tps, "mfu": tps * flops / peak if peak else None,
                       "all_step_s": [r["step_s"] for r in runs]}
    ratio = rows["anychip"]["tokens_per_s"] / rows["hand-written"]["tokens_per_s"]
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "workload": args.workload,
           "batch": args.batch, "seq": args.seq, "steps": args.steps, "kernels": args.kernels,
           "command": " ".join(sys.argv), "rows": rows, "ratio_anychip_over_hand": ratio}
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"{'config':14} {'tokens/s':>12} {'MFU':>7} {'step ms':>9} {'warm-up s':>10} {'peak GB':>8}")
    for which, r in rows.items():
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        print(f"{which:14} {r['tokens_per_s']:12,.0f} {mfu:>7} {r['step_s'] * 1e3:9.2f} {r['warmup_s']:10.1f} {r['peak_mem_gb']:8.2f}")
    print(f"ratio anychip / hand-written: {ratio:.3f}  (rounds: {statistics.median([len(v) for v in results.values()])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
