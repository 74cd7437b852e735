"""The arithmetic of a benchmark row, kept apart from the running so it can be checked by hand.

Definitions (what the report's columns mean):

- timed windows: after the warm-up the child runs ``--repeat`` windows of ``--steps`` updates
  each, back to back in its process, as a training loop runs: one device synchronisation before
  a window and one at its end, none inside, so an asynchronous backend keeps its dispatch overlap
  and still cannot look fast by leaving work queued. A window's figure is its wall time / its
  steps: seconds per step.
- step time: median of the windows' seconds per step; spread p10-p90 of the same values
  (linear interpolation, numpy's default). Median, not mean: on a shared machine another job's
  burst makes a window slower, nothing makes one faster, and the median does not move for one
  such window. The method is that of pytest-benchmark (rounds, median and interquartile range)
  and optimum-benchmark (percentiles over repetitions); pyperf's warnings are kept too: a spread
  above :data:`WIDE_SPREAD` of the median and a load average above the CPU count are reported
  (:func:`run_warnings`).
- tokens/s and samples/s: per step / step time, from the same windows, so the two columns always
  agree: tokens/s = tokens per step / median seconds per step, and its interval [p10, p90] is
  tokens per step / [p90, p10] of the seconds per step.
- MFU: tokens/s x training FLOPs per token / peak FLOP/s of the devices used
  (:func:`anychip.backends.facts.peaks.mfu`).
- cost: USD per hour of the devices used / 3600 / tokens per second x 1e6.
- loss parity: per step, :func:`anychip.parity.rel_diff` (|loss - reference loss| / |reference
  loss|; a non-finite loss never matches), against the row of the reference backend
  (``--reference``, :func:`anychip.parity.default_reference`) with the same number of processes,
  within :data:`anychip.parity.RTOL` unless --rtol says otherwise: the rule of ``anychip parity``.
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
from anychip.parity import RTOL, rel_diff

# The per-precision default tolerances, shared with `anychip parity` (one table).
PARITY_TOLERANCE = RTOL
# (p90 - p10) / median of the windows' step time above which a row is flagged as noisy.
WIDE_SPREAD = 0.10


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


def window_statistics(window_step_s: Sequence[float], tokens_per_step: float, samples_per_step: float) -> dict:
    """Step time, tokens/s and samples/s of a row from its windows' seconds per step: the
    median, and the interval [p10, p90] (a rate's p10 is the amount / the p90 step time)."""
    st = step_time_summary(window_step_s)
    return {
        "step_time_s": st,
        "tokens_per_s": per_second(tokens_per_step, st["median"]),
        "tokens_per_s_interval": [per_second(tokens_per_step, st["p90"]), per_second(tokens_per_step, st["p10"])],
        "samples_per_s": per_second(samples_per_step, st["median"]),
        "samples_per_s_interval": [per_second(samples_per_step, st["p90"]), per_second(samples_per_step, st["p10"])],
    }


def spread(step_time: dict) -> float:
    """(p90 - p10) / median of a step-time summary: 0.1 means the windows spread over 10 %."""
    return (step_time["p90"] - step_time["p10"]) / step_time["median"] if step_time["median"] > 0 else math.inf


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
    """Compare a loss trajectory with the reference one, step by step, as ``anychip parity`` does."""
    if tolerance <= 0:
        raise ValueError(f"parity tolerance must be > 0, got {tolerance}")
    n = min(len(losses), len(reference))
    worst, first = 0.0, None
    for i in range(n):
        # None is how JSON carries a non-finite loss.
        diff = rel_diff(math.nan if losses[i] is None else losses[i], math.nan if reference[i] is None else reference[i])
        worst = max(worst, diff)
        if first is None and not diff <= tolerance:
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
        "repeat": None,
        "window_step_s": [],
        "step_time_s": None,
        "tokens_per_step": None,
        "samples_per_step": None,
        "tokens_per_s": None,
        "tokens_per_s_interval": None,
        "samples_per_s": None,
        "samples_per_s_interval": None,
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
    price_table: prices.PriceTable | None = None,
) -> dict:
    """Fill ``row`` from a child's measurements and derive throughput, MFU and cost (prices from
    ``price_table``, the dated default one unless given)."""
    windows = [float(x) for x in measured["window_step_s"]]
    losses = [float(x) if x is not None and math.isfinite(float(x)) else None for x in measured["losses"]]
    stats = window_statistics(windows, measured["tokens_per_step"], measured["samples_per_step"])
    tokens_s = stats["tokens_per_s"]
    devices_used = int(measured.get("devices_used") or 1)
    per_process = int(measured.get("devices_per_process") or devices_used)
    if measured.get("layout") is not None:
        row["layout"] = dict(measured["layout"])
    row.update(
        device_kind=measured["device_kind"],
        devices=measured["devices"],
        devices_used=devices_used,
        versions=dict(measured["versions"]),
        setup_s=measured["setup_s"],
        first_step_s=measured["first_step_s"],
        warmup_s=measured["warmup_s"],
        warmup_steps=warmup,
        steps=len(windows) * int(measured["window_steps"]),
        repeat=len(windows),
        window_step_s=windows,
        batch=measured["batch"],
        seq=measured["seq"],
        tokens_per_step=measured["tokens_per_step"],
        samples_per_step=measured["samples_per_step"],
        flops_per_token=measured["flops_per_token"],
        memory=measured["memory"],
        losses=losses,
        final_loss=losses[-1] if losses else None,
        cpu_threads=measured.get("cpu_threads"),
        **stats,
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

    quote = prices.quote(row["backend"], row["device_kind"], price_overrides, price_table)
    if quote is not None:
        row["price"] = {"usd_per_device_hour": quote.usd_per_device_hour, "source": quote.source}
        row["usd_per_hour"] = quote.usd_per_device_hour * devices_used
        row["usd_per_million_tokens"] = usd_per_million_tokens(row["usd_per_hour"], tokens_s)
    return row


def add_parity(rows: list[dict], tolerance: float, reference: str | None = None) -> list[str]:
    """Compare every finished row's loss trajectory with that of the ``reference`` backend's row
    with the same number of processes (rows of other process counts trained on other global
    batches: N x batch samples per step). A world size whose reference row did not finish gets no
    parity figure, and one line saying so is returned. ``reference`` None is how documents from
    before --reference chose: the first finished row of each world size."""
    finished = [r for r in rows if r["status"] == "ok" and r["losses"]]
    notes = []
    if reference is None:
        references: dict[int, dict] = {}
        for row in finished:
            references.setdefault(row_world_size(row), row)
    else:
        references = {row_world_size(r): r for r in finished if r["backend"] == reference}
        planned = {row_world_size(r): r for r in rows if r["backend"] == reference}
        for world in sorted({row_world_size(r) for r in finished} - set(references)):
            ref = planned.get(world)
            label = row_label({"backend": reference, "world_size": world})
            why = f"it is {ref['status']}" if ref else "it did not run at this process count"
            notes.append(f"parity: no figure for the rows of {world} process(es): the reference {label} has no losses ({why})")
    for row in finished:
        ref = references.get(row_world_size(row))
        row["parity"] = loss_parity(row["losses"], ref["losses"], tolerance, row_label(ref)).as_dict() if ref else None
    return notes


def run_warnings(rows: list[dict], load: dict | None) -> list[str]:
    """One line per reason to distrust the timings: the machine's 1-minute load average went
    above its CPU count (other work competed for them), or a row's windows spread over more than
    :data:`WIDE_SPREAD` of its median step time."""
    out = []
    if load and load.get("cores") and load.get("max_1min") is not None and load["max_1min"] > load["cores"]:
        out.append(f"the machine was loaded: 1-minute load average up to {load['max_1min']:.2f} on {load['cores']} cores; "
                   "other work shared the CPUs, so the timings are slower and noisier than on an idle machine")
    for row in rows:
        st = row.get("step_time_s")
        if row["status"] != "ok" or not st:
            continue
        wide = spread(st)
        if wide > WIDE_SPREAD:
            out.append(f"{row_label(row)}: step time p10-p90 spans {wide:.0%} of the median over {row.get('repeat') or '?'} windows "
                       f"(above {WIDE_SPREAD:.0%}): noisy; rerun on an idle machine, or raise --steps or --repeat")
    return out


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
