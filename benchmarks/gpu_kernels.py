"""anychip's CUDA kernels on a GPU: correctness against the reference, then speed and memory.

    python benchmarks/gpu_kernels.py OUT.json [--ops rms_norm,swiglu,...] [--skip-check]

1. Correctness: every CUDA implementation (Triton kernels, torch_chunked, SDPA) against the
   reference evaluated in float64, forward and the gradients of every differentiable input,
   in bf16 and fp32, on a model-sized shape and an odd one.
2. Speed: forward+backward time per op (``triton.testing.do_bench``, median) for the eager
   reference, the reference compiled by inductor, and each implementation; GB/s for the
   memory-bound ops (rms_norm, swiglu, rotary), TFLOP/s for attention.
3. Memory: peak allocated memory of linear_cross_entropy against the unfused LM head
   (``F.cross_entropy(F.linear(h, W).float(), t)``) at GPT-2-small size: 16*1024 tokens,
   d=768, V=50257, bf16.

Prints tables and writes everything as JSON to OUT.json; exits 1 if a check failed. Needs
only torch and triton (no jax/torchax); written for torch >= 2.5 and Triton >= 3.0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import anychip.kernels as kernels  # noqa: E402
from anychip.kernels.attention import attention  # noqa: E402
from anychip.kernels.attention import reference as attention_reference  # noqa: E402
from anychip.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from anychip.kernels.linear_cross_entropy import reference as lce_reference  # noqa: E402
from anychip.kernels.rms_norm import reference as rms_reference  # noqa: E402
from anychip.kernels.rms_norm import rms_norm  # noqa: E402
from anychip.kernels.rotary import reference as rotary_reference  # noqa: E402
from anychip.kernels.rotary import rotary, rotary_tables  # noqa: E402
from anychip.kernels.swiglu import reference as swiglu_reference  # noqa: E402
from anychip.kernels.swiglu import swiglu  # noqa: E402

OPS = ("rms_norm", "swiglu", "rotary", "attention", "linear_cross_entropy")
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # max |err| / max |ref|, per tensor
DEV = "cuda"


# --- the ops as (inputs, function, reference, differentiable inputs, bytes, flops) -------------


def _randn(*shape, dtype, scale=1.0, transpose=False):
    if transpose:  # [B, H, T, D] as the transposed view of a [B, T, H, D] projection
        b, h, t, d = shape
        return (torch.randn(b, t, h, d, device=DEV) * scale).to(dtype).transpose(1, 2)
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def case(op: str, size: str, dtype: torch.dtype):
    """One problem: (inputs, fn(kernels) -> callable, reference callable, diff idx, bytes, flops)."""
    if op == "rms_norm":
        rows, dim = {"model": (16 * 1024, 768), "odd": (1000, 1001)}[size]
        inputs = [_randn(rows, dim, dtype=dtype, scale=3), 1 + 0.1 * _randn(dim, dtype=dtype)]
        return (inputs, lambda k: (lambda x, w: rms_norm(x, w, 1e-6, kernels=k)),
                lambda x, w: rms_reference.rms_norm(x, w, 1e-6), [0, 1],
                5 * rows * dim * inputs[0].element_size(), 0)
    if op == "swiglu":
        shape = {"model": (16 * 1024, 3072), "odd": (777, 1234)}[size]
        inputs = [_randn(*shape, dtype=dtype, scale=3), _randn(*shape, dtype=dtype)]
        numel = inputs[0].numel()
        return (inputs, lambda k: (lambda g, u: swiglu(g, u, kernels=k)), swiglu_reference.swiglu, [0, 1],
                8 * numel * inputs[0].element_size(), 0)
    if op == "rotary":
        b, hq, hk, t, d = {"model": (16, 12, 12, 1024, 64), "odd": (3, 6, 2, 77, 96)}[size]
        cos, sin = rotary_tables(t, d, device=DEV)
        inputs = [_randn(b, hq, t, d, dtype=dtype, transpose=True), _randn(b, hk, t, d, dtype=dtype, transpose=True)]
        numel = inputs[0].numel() + inputs[1].numel()
        return (inputs, lambda k: (lambda q, kk: rotary(q, kk, cos, sin, kernels=k)),
                lambda q, kk: rotary_reference.rotary(q, kk, cos, sin), [0, 1], 4 * numel * inputs[0].element_size(), 0)
    if op == "attention":
        b, hq, hk, t, d = {"model": (16, 12, 12, 1024, 64), "odd": (2, 6, 2, 333, 64)}[size]
        inputs = [_randn(b, hq, t, d, dtype=dtype), _randn(b, hk, t, d, dtype=dtype), _randn(b, hk, t, d, dtype=dtype)]
        return (inputs, lambda k: (lambda q, kk, v: attention(q, kk, v, True, kernels=k)),
                lambda q, kk, v: attention_reference.attention(q, kk, v, True), [0, 1, 2], 0,
                3.5 * 4 * b * hq * t * t * d / 2)
    if op == "linear_cross_entropy":
        n, dim, vocab = {"model": (16 * 1024, 768, 50257), "odd": (1000, 129, 1001)}[size]
        targets = torch.randint(0, vocab, (n,), device=DEV)
        targets[::7] = -100
        inputs = [_randn(n, dim, dtype=dtype), _randn(vocab, dim, dtype=dtype, scale=dim**-0.5), targets]
        return (inputs, lambda k: (lambda h, w, t: linear_cross_entropy(h, w, t, kernels=k)),
                lambda h, w, t: lce_reference.linear_cross_entropy(h, w, t), [0, 1], 0, 3 * 2 * n * dim * vocab)
    raise ValueError(op)


def implementations(op: str) -> list[str]:
    rows = kernels.available("cuda")
    return [r.name for r in rows if r.op == op and r.available and not r.reason and r.name != "reference"]


# --- 1. correctness -------------------------------------------------------------------------


def _forward_backward(fn, inputs, diff, cots=None):
    """Outputs, gradients of the inputs ``diff``, and the cotangents used (random by default)."""
    leaves = [t.detach().clone().requires_grad_(i in diff) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    if cots is None:
        cots = [torch.randn(o.shape, device=DEV).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [leaves[i] for i in diff], [c.to(o.dtype) for c, o in zip(cots, outs)])
    return [o.detach() for o in outs], list(grads), cots


def check(op: str, impl: str, size: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    inputs, make, reference, diff, _, _ = case(op, size, dtype)
    outs, grads, cots = _forward_backward(make(impl), inputs, diff)
    wide = [t.double() if t.dtype.is_floating_point else t for t in inputs]
    ref_outs, ref_grads, _ = _forward_backward(reference, wide, diff, cots)  # the same cotangents, widened
    errors = {}
    for name, a, e in [(f"out{i}", a, e) for i, (a, e) in enumerate(zip(outs, ref_outs))] + [
        (f"d{i}", a, e) for i, a, e in zip(diff, grads, ref_grads)
    ]:
        scale = e.abs().max().item() if e.numel() else 0.0  # gradients of a mean loss are ~1/N
        errors[name] = (a.double() - e).abs().max().item() / (scale or 1.0) if e.numel() else 0.0
    worst = max(errors.values())
    shape = [tuple(t.shape) for t in inputs]
    return {"op": op, "impl": impl, "size": size, "dtype": str(dtype).removeprefix("torch."), "shapes": shape,
            "errors": errors, "max_error": worst, "tolerance": TOLERANCE[dtype], "ok": worst <= TOLERANCE[dtype]}


# --- 2. speed -------------------------------------------------------------------------------


def time_ms(fn, inputs, diff) -> float:
    import triton.testing

    leaves = [t.detach().clone().requires_grad_(i in diff) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    cots = [torch.randn_like(o) for o in outs]

    def step():
        result = fn(*leaves)
        result = result if isinstance(result, tuple) else (result,)
        torch.autograd.grad(result, [leaves[i] for i in diff], cots)

    step()  # compile / warm up
    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def speed(op: str) -> list[dict]:
    torch.manual_seed(0)
    inputs, make, _, diff, bytes_moved, flops = case(op, "model", torch.bfloat16)
    variants = {"reference": make("reference"), "reference+compile": torch.compile(make("reference"))}
    variants.update({impl: make(impl) for impl in implementations(op)})
    rows, base, compiled = [], None, None
    for name, fn in variants.items():
        ms = time_ms(fn, inputs, diff)
        base = ms if name == "reference" else base
        compiled = ms if name == "reference+compile" else compiled
        row = {"op": op, "impl": name, "dtype": "bfloat16", "shapes": [tuple(t.shape) for t in inputs], "ms": ms,
               "speedup_vs_reference": base / ms,
               "speedup_vs_compiled_reference": (compiled / ms) if compiled else None}
        if bytes_moved:
            row["GB/s"] = bytes_moved / ms / 1e6
        if flops:
            row["TFLOP/s"] = flops / ms / 1e9
        rows.append(row)
    return rows


# --- 3. memory of the LM head ---------------------------------------------------------------


def _head(impl: str):
    return lambda h, w, t: linear_cross_entropy(h, w, t, kernels=impl)


def lce_memory() -> list[dict]:
    n, dim, vocab = 16 * 1024, 768, 50257
    torch.manual_seed(0)
    hidden = torch.randn(n, dim, device=DEV, dtype=torch.bfloat16)
    weight = (torch.randn(vocab, dim, device=DEV) * dim**-0.5).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device=DEV)

    def unfused(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t)

    variants = {"unfused head": unfused}
    for impl in implementations("linear_cross_entropy"):
        variants[impl] = _head(impl)
    rows = []
    for name, fn in variants.items():
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        torch.autograd.grad(fn(h, w, targets), (h, w))  # warm up (allocator, autotune)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = fn(h, w, targets)
        after_forward = torch.cuda.max_memory_allocated() - before
        torch.autograd.grad(loss, (h, w))
        torch.cuda.synchronize()
        rows.append({
            "impl": name, "tokens": n, "dim": dim, "vocab": vocab, "dtype": "bfloat16",
            "peak_MiB_forward": after_forward / 2**20,
            "peak_MiB_forward_backward": (torch.cuda.max_memory_allocated() - before) / 2**20,
            "seconds_one_step": time.perf_counter() - start,
            "loss": loss.item(),
        })
        del h, w, loss
        torch.cuda.empty_cache()
    return rows


# --- report ---------------------------------------------------------------------------------


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    parser.add_argument("--skip-check", action="store_true", help="only time and measure memory")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    ops = [o for o in args.ops.split(",") if o]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks against float64 need real fp32
    torch.backends.cudnn.allow_tf32 = False
    import triton

    result = {
        "env": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                "gpu": torch.cuda.get_device_name(), "python": platform.python_version()},
        "available": [dataclasses.asdict(r) for r in kernels.available("cuda")],
        "correctness": [], "timings": [], "lce_memory": [],
    }
    if not args.skip_check:
        for op in ops:
            for impl in implementations(op):
                for size in ("model", "odd"):
                    for dtype in (torch.bfloat16, torch.float32):
                        row = check(op, impl, size, dtype)
                        result["correctness"].append(row)
                        print(f"check {op:22s} {impl:14s} {size:5s} {row['dtype']:8s} "
                              f"max_err={row['max_error']:.2e} {'ok' if row['ok'] else 'FAIL'}", flush=True)
        print()
    for op in ops:
        result["timings"] += speed(op)
    print(_table(result["timings"], ["op", "impl", "ms", "speedup_vs_reference", "speedup_vs_compiled_reference",
                                     "GB/s", "TFLOP/s"]))
    print()
    if "linear_cross_entropy" in ops:
        result["lce_memory"] = lce_memory()
        print(_table(result["lce_memory"], ["impl", "peak_MiB_forward", "peak_MiB_forward_backward",
                                            "seconds_one_step", "loss"]))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    failed = [r for r in result["correctness"] if not r["ok"]]
    if failed:
        print(f"\n{len(failed)} correctness check(s) FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
