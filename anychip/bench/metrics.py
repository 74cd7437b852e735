"""The arithmetic of a benchmark row, kept apart from the running so it can be checked by hand.

Definitions (what the report's columns mean):

- step time: wall time of one optimizer update *including* a device synchronisation, so an
  asynchronous backend cannot look fast by queueing work; median, p10 and p90 over the timed
  steps (warm-up and compilation excluded and reported separately).
- tokens/s and samples/s: tokens (samples) of a throughput window (half the timed steps, run
  back to back with one synchronisation at the end, as a training loop runs) / its wall time.
  The percentiles come from the other half, synchronised per step. Without a window (fewer
  than 4 timed steps): per step / median step time.
- MFU: tokens/s x training FLOPs per token / peak FLOP/s of the devices used
  (:func:`anychip.backends.facts.peaks.mfu`).
- cost: USD per hour of the devices used / 3600 / tokens per second x 1e6.
- loss parity: per step, |loss - reference loss| / max(|reference loss|, 1e-12), against the
  first row that finished with the same number of processes; a non-finite loss counts as an
  infinite difference.
- several processes (``--nproc N``, torchrun): weak scaling, each process keeps ``batch``, a
  step trains on N x batch samples, and tokens/s counts them all (rank 0 times the steps; every
  step ends in a gradient all-reduce, so it cannot finish before the slowest rank). The devices
  used are N x those of one process, at most the machine's (N processes on one CPU share it).
  Rows of different N trained on different global batches, so their losses are not compared.
- scaling efficiency of an N-process row: its tokens/s / (N x tokens/s of the 1-process row of
  the same backend in the same run); 1.0 is perfect, null without a finished 1-process row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from anychip.backends.facts import peaks
from anychip.bench import prices

# Relative loss tolerance per precision. fp32 on different stacks differs in reduction order
# only (expect 1e-6..1e-4 after tens of steps); bf16 autocast rounds every matmul input to
# 8 bits of mantissa, so trajectories drift apart at the 1e-2 level within a few steps.
PARITY_TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2, "bf16-pure": 6e-2}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default method), without numpy."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def step_time_summary(times: Sequence[float]) -> dict[str, float]:
    return {
        "median": percentile(times, 50),
        "p10": percentile(times, 10),
        "p90": percentile(times, 90),
        "mean": sum(times) / len(times),
        "min": min(times),
        "max": max(times),
    }


def per_second(amount_per_step: float, step_seconds: float) -> float:
    if step_seconds <= 0:
        raise ValueError(f"step time must be > 0, got {step_seconds}")
    return amount_per_step / step_seconds


def usd_per_million_tokens(usd_per_hour: float | None, tokens_per_second: float | None) -> float | None:
    if usd_per_hour is None or not tokens_per_second:
        return None
    return usd_per_hour / 3600.0 / tokens_per_second * 1e6


def mfu(tokens_per_second: float | None, flops_per_token: float | None, peak_flops: float | None) -> float | None:
    if tokens_per_second is None or flops_per_token is None:
        return None
    return peaks.mfu(tokens_per_second, flops_per_token, peak_flops)


@dataclasses.dataclass(frozen=True)
class Parity:
    reference: str
    tolerance: float
    steps_compared: int
    max_rel_diff: float
    first_step_over: int | None  # 1-based step number, None when every step is within tolerance

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # JSON has no infinity: a non-finite loss is reported as null with the step that broke.
        if not math.isfinite(self.max_rel_diff):
            d["max_rel_diff"] = None
        return d


def loss_parity(losses: Sequence[float | None], reference: Sequence[float | None], tolerance: float, reference_name: str) -> Parity:
    """Compare a loss trajectory with the reference one, step by step."""
    if tolerance <= 0:
        raise ValueError(f"parity tolerance must be > 0, got {tolerance}")
    n = min(len(losses), len(reference))
    worst, first = 0.0, None
    for i in range(n):
        # None is how JSON carries a non-finite loss.
        a = math.nan if losses[i] is None else losses[i]
        r = math.nan if reference[i] is None else reference[i]
        if not (math.isfinite(a) and math.isfinite(r)):
            diff = 0.0 if (a == r or (math.isnan(a) and math.isnan(r))) else math.inf
        else:
            diff = abs(a - r) / max(abs(r), 1e-12)
        worst = max(worst, diff)
        if first is None and diff > tolerance:
            first = i + 1
    if len(losses) != len(reference) and first is None:
        first = n + 1  # one trajectory stopped early: the first missing step is a mismatch
    return Parity(reference_name, tolerance, n, worst, first)


# -- rows -------------------------------------------------------------------------------------------

ROW_STATUSES = ("ok", "failed", "crashed", "timeout", "interrupted", "unavailable", "skipped")


def row_world_size(row: dict) -> int:
    """The row's process count; documents from before --nproc have no world_size: 1."""
    return row.get("world_size") or 1


def row_label(row: dict) -> str:
    """How a row is named in notes, parity and comparisons: the backend, plus the process count
    when it is more than one ("cpu (nproc 2)"). A row is identified by (backend, world size)."""
    world = row_world_size(row)
    return row["backend"] if world == 1 else f"{row['backend']} (nproc {world})"


def row_key(row: dict) -> tuple[str, int]:
    return row["backend"], row_world_size(row)


def empty_row(backend: str, status: str, error: str | None, precision: str, *, world_size: int = 1, parallel: str | None = None) -> dict:
    """A row with every field present and nothing measured (the schema requires all keys)."""
    if status not in ROW_STATUSES:
        raise ValueError(f"unknown row status {status!r}")
    if (parallel is None) != (world_size == 1):
        raise ValueError(f"world_size {world_size} with parallel={parallel!r}: one process has no parallel mode, several need one")
    return {
        "backend": backend,
        "world_size": world_size,
        "parallel": parallel,
        "layout": None,
        "status": status,
        "error": error,
        "device_kind": "",
        "devices": None,
        "devices_used": None,
        "versions": {},
        "precision": precision,
        "startup_s": None,
        "setup_s": None,
        "first_step_s": None,
        "warmup_s": None,
        "warmup_steps": 0,
        "steps": 0,
        "batch": None,
        "seq": None,
        "step_time_s": None,
        "step_times_s": [],
        "tokens_per_step": None,
        "samples_per_step": None,
        "tokens_per_s": None,
        "samples_per_s": None,
        "flops_per_token": None,
        "peak_flops": None,
        "peak_flops_source": None,
        "mfu": None,
        "memory": None,
        "losses": [],
        "final_loss": None,
        "parity": None,
        "price": None,
        "usd_per_hour": None,
        "usd_per_million_tokens": None,
        "scaling_efficiency": None,
        "cpu_threads": None,
        "wall_s": None,
        "log_tail": [],
    }


def _override(overrides: dict[str, float] | None, *keys: str) -> tuple[str, float] | None:
    """The value given for the first of ``keys`` (backend name, then device kind) in
    ``NAME=VALUE`` overrides, compared case-insensitively; the bare form is stored under ``*``."""
    overrides = overrides or {}
    for key in keys:
        for name, value in overrides.items():
            if key and name != "*" and name.lower() == key.lower():
                return name, value
    if "*" in overrides:
        return "*", overrides["*"]
    return None


def finish_row(
    row: dict,
    measured: dict,
    *,
    warmup: int,
    price_overrides: dict[str, float] | None = None,
    peak_tflops: dict[str, float] | None = None,
) -> dict:
    """Fill ``row`` from a child's measurements and derive throughput, MFU and cost."""
    times = measured["step_times_s"]
    losses = [float(x) if x is not None and math.isfinite(float(x)) else None for x in measured["losses"]]
    summary = step_time_summary(times)
    devices_used = int(measured.get("devices_used") or 1)
    per_process = int(measured.get("devices_per_process") or devices_used)
    if measured.get("layout") is not None:
        row["layout"] = dict(measured["layout"])
    window = measured.get("throughput_window")
    if window and window.get("seconds"):
        per_step_s = window["seconds"] / window["steps"]
    else:
        window, per_step_s = None, summary["median"]
    tokens_s = per_second(measured["tokens_per_step"], per_step_s)
    samples_s = per_second(measured["samples_per_step"], per_step_s)
    row.update(
        device_kind=measured["device_kind"],
        devices=measured["devices"],
        devices_used=devices_used,
        versions=dict(measured["versions"]),
        setup_s=measured["setup_s"],
        first_step_s=measured["first_step_s"],
        warmup_s=measured["warmup_s"],
        warmup_steps=warmup,
        steps=len(times) + (window["steps"] if window else 0),
        throughput_window=window,
        batch=measured["batch"],
        seq=measured["seq"],
        step_time_s=summary,
        step_times_s=list(times),
        tokens_per_step=measured["tokens_per_step"],
        samples_per_step=measured["samples_per_step"],
        tokens_per_s=tokens_s,
        samples_per_s=samples_s,
        flops_per_token=measured["flops_per_token"],
        memory=measured["memory"],
        losses=losses,
        final_loss=losses[-1] if losses else None,
        cpu_threads=measured.get("cpu_threads"),
    )
    # Peak of the devices one process drives: --peak-tflops (per backend / device kind, or for
    # every row) beats the backend's own figure from anychip.backends.facts.peaks. The row's
    # peak is that of the devices it uses: N processes on distinct devices have N times it (on
    # shared devices, as often as there are devices).
    given = _override(peak_tflops, row["backend"], row["device_kind"])
    process_peak = None
    if given is not None:
        process_peak = given[1] * 1e12
        row["peak_flops_source"] = "--peak-tflops " + (f"{given[1]:g}" if given[0] == "*" else f"{given[0]}={given[1]:g}")
    elif measured.get("peak_flops"):
        process_peak = float(measured["peak_flops"])
        peak = peaks.lookup(row["device_kind"])
        row["peak_flops_source"] = peak.source if peak else "backend.peak_flops()"
    if process_peak is not None:
        row["peak_flops"] = process_peak * devices_used / per_process
    row["mfu"] = mfu(tokens_s, row["flops_per_token"], row["peak_flops"])

    quote = prices.quote(row["backend"], row["device_kind"], price_overrides)
    if quote is not None:
        row["price"] = {"usd_per_device_hour": quote.usd_per_device_hour, "source": quote.source}
        row["usd_per_hour"] = quote.usd_per_device_hour * devices_used
        row["usd_per_million_tokens"] = usd_per_million_tokens(row["usd_per_hour"], tokens_s)
    return row


def add_parity(rows: list[dict], tolerance: float) -> None:
    """Compare every finished row's loss trajectory with that of the first finished row with
    the same number of processes. Rows of different process counts trained on different
    global batches (N x batch samples per step), so comparing their losses would only ever
    report a mismatch that is not one."""
    finished = [r for r in rows if r["status"] == "ok" and r["losses"]]
    references: dict[int, dict] = {}
    for row in finished:
        ref = references.setdefault(row_world_size(row), row)
        row["parity"] = loss_parity(row["losses"], ref["losses"], tolerance, row_label(ref)).as_dict()


def scaling_efficiency(tokens_per_s: float | None, world_size: int, baseline_tokens_per_s: float | None) -> float | None:
    """tokens/s of ``world_size`` processes / (``world_size`` x tokens/s of one process)."""
    if not tokens_per_s or not baseline_tokens_per_s or world_size < 1:
        return None
    return tokens_per_s / (world_size * baseline_tokens_per_s)


def add_scaling(rows: list[dict]) -> None:
    """Set ``scaling_efficiency`` of every finished multi-process row against the finished
    1-process row of the same backend (None where there is none; None on 1-process rows)."""
    baseline = {r["backend"]: r for r in rows if row_world_size(r) == 1 and r["status"] == "ok"}
    for row in rows:
        world = row_world_size(row)
        base = baseline.get(row["backend"])
        ok = world > 1 and row["status"] == "ok" and base is not None
        row["scaling_efficiency"] = scaling_efficiency(row["tokens_per_s"], world, base["tokens_per_s"]) if ok else None
