#!/usr/bin/env python3
"""GPT-2 small, batch 16 x 1024, bf16, three ways in one process on one GPU:

  a. the hand-written loop: ``torch.compile`` + bf16 autocast + fused AdamW (the baseline,
     :func:`anychip.bench.baseline.plain_torch_step`);
  b. ``anychip.TrainStep`` on the ``cuda`` backend;
  c. ``anychip.TrainStep`` on ``jax:gpu`` (the same torch model traced through torchax).

All three start from the same weights, see the same batches, clip gradients at 1.0 and use
AdamW(lr=3e-4, weight_decay=0.1). Each runs ``--warmup`` untimed steps (compilation happens
there), then ``--steps`` timed steps between two device synchronisations. Reported: tokens/s,
MFU against ``--peak`` (default: the GPU's dense bf16 peak from anychip.backends.facts.peaks),
ratios b/a and c/a of tokens/s, peak device memory, compile (first step) time and the losses.
One configuration failing does not stop the others; its error is reported instead.

The torch configurations run first and release their memory before JAX starts; JAX's
preallocation is switched off (``XLA_PYTHON_CLIENT_PREALLOCATE=false``, override it in the
environment) so the two allocators can share the GPU.

    python3 benchmarks/gpu_jax_vs_torch.py result.json                  # on the H100
    python3 benchmarks/gpu_jax_vs_torch.py out.json --workload gpt-tiny --device cpu --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Run from a checkout without installing: the repository root holds the anychip package.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LR, WEIGHT_DECAY, BETAS, EPS, CLIP = 3e-4, 0.1, (0.9, 0.999), 1e-8, 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="gpu_jax_vs_torch.json", help="JSON file to write")
    p.add_argument("--workload", default="gpt-small")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a quick smoke run of this script")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--distinct-batches", type=int, default=4, help="batches generated up front and cycled")
    p.add_argument("--peak", type=float, default=None, help="peak FLOP/s for MFU (default on cuda: the GPU's dense bf16 peak, "
                   "from anychip.backends.facts.peaks)")
    p.add_argument("--on-nonfinite", default="raise", choices=("raise", "skip", "ignore"),
                   help="TrainStep policy; 'raise' (the default) reads one flag back per step, as TorchEngine does")
    p.add_argument("--only", default="abc", help="subset of configurations to run, e.g. 'ac'")
    return p.parse_args(argv)


def timed(step, sync, batches, warmup: int, steps: int) -> dict:
    """Run warm-up then timed steps; ``step(batch)`` returns the loss (any scalar-like)."""
    losses = []
    t0 = time.perf_counter()
    for i in range(warmup):
        loss = step(batches[i % len(batches)])
        if i == 0:
            sync()
            first = time.perf_counter() - t0
        losses.append(loss)
    sync()
    t1 = time.perf_counter()
    for i in range(steps):
        losses.append(step(batches[(warmup + i) % len(batches)]))
    sync()
    elapsed = time.perf_counter() - t1
    return {"first_step_s": first if warmup else None, "timed_s": elapsed, "losses": [float(x) for x in losses]}


def summarise(result: dict, args, tokens_per_step: int, flops_per_token: float) -> dict:
    tps = args.steps * tokens_per_step / result["timed_s"]
    result.update(
        tokens_per_s=tps,
        step_ms=1e3 * result["timed_s"] / args.steps,
        mfu=tps * flops_per_token / args.peak if args.peak else None,
        first_loss=result["losses"][0],
        last_loss=result["losses"][-1],
    )
    return result


# -- a. the hand-written torch loop --------------------------------------------------------------


def run_handwritten(args, workload, batches):
    import torch

    from anychip.bench.baseline import plain_torch_step
    from anychip.optim import AdamW

    cuda = args.device == "cuda"
    # forward + cross-entropy compiled together; inductor on CPU would only slow a smoke run down
    step = plain_torch_step(workload.build(seed=0), workload.loss_fn, AdamW(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY),
                            device=args.device, precision="bf16", compile=cuda, max_grad_norm=CLIP, fused=cuda)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = timed(lambda batch: step(batch).detach(), sync, batches, args.warmup, args.steps)
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    result["memory_source"] = "torch.cuda.max_memory_allocated" if cuda else None
    return result


# -- b / c. anychip TrainStep --------------------------------------------------------------------


def run_trainstep(args, workload, batches, backend_name: str):
    import anychip as ac

    backend = ac.backend(backend_name)
    if backend_name == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    step = ac.TrainStep(
        workload.build(seed=0), workload.loss_fn,
        ac.AdamW(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY),
        backend=backend, precision="bf16", max_grad_norm=CLIP, on_nonfinite=args.on_nonfinite,
    )
    result = timed(lambda b: step(b).loss_tensor, step.synchronize, batches, args.warmup, args.steps)
    try:
        mem = backend.memory_stats()
        result.update(peak_memory_bytes=mem.peak_bytes, memory_source=mem.source)
    except Exception as exc:  # noqa: BLE001 - e.g. an older torch without torch.accelerator.memory_*
        import torch

        result.update(memory_error=f"{type(exc).__name__}: {exc}")
        if backend_name == "cuda":
            result.update(peak_memory_bytes=torch.cuda.max_memory_allocated(), memory_source="torch.cuda.max_memory_allocated")
    result["backend"] = repr(backend)
    engine = step.engine
    if hasattr(engine, "compiles"):
        result["compiles"] = engine.compiles
    if hasattr(engine, "kernels_used"):
        result["kernels_used"] = sorted(engine.kernels_used)
    return result


def release_torch_memory():
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort between configurations
        pass


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "jax", "jaxlib", "torchax", "optax", "jax-cuda12-plugin", "jax-cuda13-plugin", "triton"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from anychip import workloads

    workload = workloads.get(args.workload)
    batches = [workload.batch(i, args.batch, args.seq, seed=0) for i in range(args.distinct_batches)]
    if args.device == "cuda":
        batches = [tuple(t.pin_memory() for t in b) for b in batches]
    tokens_per_step = args.batch * args.seq
    flops_per_token = workload.flops_per_token(workload.build(seed=0), args.seq)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    if args.peak is None and args.device == "cuda":
        from anychip.backends.facts.peaks import peak_flops

        args.peak = peak_flops(device_name, "bf16")  # None for a GPU the table does not know: MFU "-"
    configs = {
        "a": ("a_torch_compile_handwritten", lambda: run_handwritten(args, workload, batches)),
        "b": (f"b_anychip_{args.device}", lambda: run_trainstep(args, workload, batches, args.device)),
        "c": ("c_anychip_jax_gpu" if args.device == "cuda" else "c_anychip_jax_cpu",
              lambda: run_trainstep(args, workload, batches, "jax:gpu" if args.device == "cuda" else "jax:cpu")),
    }
    report = {
        "device": device_name,
        "workload": args.workload,
        "batch": args.batch,
        "seq": args.seq,
        "precision": "bf16",
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_flops": args.peak,
        "flops_per_token": flops_per_token,
        "on_nonfinite": args.on_nonfinite,
        "versions": versions(),
        "configs": {},
    }
    for key in "abc":  # torch first: JAX starts after torch has released its memory
        if key not in args.only:
            continue
        name, run = configs[key]
        print(f"== {name}", flush=True)
        try:
            result = summarise(run(), args, tokens_per_step, flops_per_token)
            result["ok"] = True
        except Exception as exc:  # noqa: BLE001 - one failure must not hide the other results
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            print(result["traceback"], file=sys.stderr, flush=True)
        report["configs"][name] = result
        release_torch_memory()
    results = {k[0]: v for k, v in report["configs"].items() if v.get("ok")}
    if "a" in results:
        base = results["a"]["tokens_per_s"]
        report["ratios"] = {f"{k}/a": results[k]["tokens_per_s"] / base for k in ("b", "c") if k in results}
    print(f"\n{args.workload} batch {args.batch}x{args.seq} bf16 on {device_name}")
    print(f"{'configuration':34s} {'tokens/s':>12s} {'ms/step':>9s} {'MFU':>7s} {'peak GiB':>9s} {'1st step s':>10s} {'last loss':>10s}")
    for name, r in report["configs"].items():
        if not r.get("ok"):
            print(f"{name:34s} FAILED: {r['error'][:200]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-"
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "-"
        print(f"{name:34s} {r['tokens_per_s']:12.0f} {r['step_ms']:9.1f} {mfu:>7s} {mem:>9s} {first:>10s} {r['last_loss']:10.4f}")
    for k, v in report.get("ratios", {}).items():
        print(f"tokens/s ratio {k}: {v:.3f}")
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {args.out}")
    return 0 if all(r.get("ok") for r in report["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
