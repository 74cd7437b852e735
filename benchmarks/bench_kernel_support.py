"""Shared by the bench_kernel_<op>.py files (no benchmarks here).

Each op's file times forward+backward of every implementation that runs natively on this
machine (anychip.kernels.available: no interpreters, nothing experimental), reference first,
in one pytest-benchmark run; every implementation's ``extra_info`` carries its ratio to the
reference's median, and GB/s (memory-bound ops), TFLOP/s or peak memory where they apply.

    pytest benchmarks/bench_kernel_rms_norm.py --benchmark-only [--benchmark-json out.json]

On CUDA the Triton kernels are also compared with the reference compiled by inductor
("reference+compile"): the baseline a torch.compile user already has.
"""

from __future__ import annotations

import torch

import anychip.kernels as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = DEVICE
_MEDIANS: dict[str, float] = {}  # op -> the reference's median seconds, this run


def implementations(op: str) -> list[str]:
    """Implementations that run natively here: reference first, then by table order."""
    names = [r.name for r in kernels.available(BACKEND) if r.op == op and r.available and not r.reason]
    names.sort(key=lambda name: name != "reference")
    if DEVICE == "cuda":
        names.insert(1, "reference+compile")
    return names


def kernels_arg(impl: str) -> str:
    return "reference" if impl == "reference+compile" else impl


def maybe_compile(impl: str, fn):
    return torch.compile(fn) if impl == "reference+compile" else fn


def run(benchmark, op: str, impl: str, step, *, bytes_moved: float = 0.0, flops: float = 0.0) -> None:
    """Time ``step()`` (one forward+backward); record ratio, GB/s, TFLOP/s, peak memory."""

    def timed():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    timed()  # warm-up: compilation, autotuning, allocator
    peak = None
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        timed()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.group = op
    benchmark.extra_info.update(op=op, implementation=impl, device=DEVICE)
    benchmark(timed)
    if benchmark.stats is None:  # --benchmark-disable
        return
    median = benchmark.stats.stats.median
    if impl == "reference":
        _MEDIANS[op] = median
    if op in _MEDIANS:
        benchmark.extra_info["speedup_vs_reference"] = round(_MEDIANS[op] / median, 3)
    if bytes_moved:
        benchmark.extra_info["GB/s"] = float(f"{bytes_moved / median / 1e9:.3g}")
    if flops:
        benchmark.extra_info["TFLOP/s"] = float(f"{flops / median / 1e12:.3g}")
    if peak is not None:
        benchmark.extra_info["peak_MiB_above_inputs"] = round(peak, 1)
