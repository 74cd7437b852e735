"""`anychip bench` end to end: real measuring processes, one per backend, with test-only backends
that crash, raise, hang or claim a peak FLOP/s (tests/bench/anychip_bench_fakes.py). Signals to
the bench and the rest of the faults a worker can commit: test_bench_faults.py."""

from __future__ import annotations

import csv
import ctypes
import json
import signal
import subprocess
import sys
import time

import pytest
from bench_support import run_cli

from anychip.bench import schema

pytestmark = pytest.mark.slow
FAST = ["--workload", "mlp", "--steps", "2", "--repeat", "2", "--warmup", "1", "--precision", "fp32"]


def _rows(doc):
    return {r["backend"]: r for r in doc["rows"]}


def _subreaper() -> int | None:
    """This process's PR_GET_CHILD_SUBREAPER (Linux; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    value = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(37, ctypes.byref(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    return value.value


def test_failures_stay_rows_and_the_others_complete(fakes, tmp_path):
    out = {ext: str(tmp_path / f"bench.{ext}") for ext in ("json", "csv", "md", "png")}
    # In this process, as a library: the bench must hand back the signal handlers and the
    # subreaper setting it changed, and leave a child it did not start alone.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    subreaper = _subreaper()
    older = subprocess.Popen(["sleep", "120"])
    try:
        code, stdout, err = run_cli(
            "bench", *FAST, "--backends", "cpu,fake-crash,fake-accel,fake-raise,fake-missing", "--timeout", "120",
            "--price", "fake-accel=3.6", "--json", out["json"], "--csv", out["csv"], "--md", out["md"], "--plot", out["png"],
        )
        assert older.poll() is None
    finally:
        older.kill()
        older.wait()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert _subreaper() == subreaper
    assert code == 1, err  # some requested backends failed
    with open(out["json"]) as fh:
        doc = json.load(fh)
    assert schema.validate(doc) == []
    rows = _rows(doc)
    assert [r["backend"] for r in doc["rows"]] == ["cpu", "fake-crash", "fake-accel", "fake-raise", "fake-missing"]
    assert {n: r["status"] for n, r in rows.items()} == {
        "cpu": "ok", "fake-crash": "crashed", "fake-accel": "ok", "fake-raise": "failed", "fake-missing": "unavailable",
    }
    assert rows["fake-crash"]["error"].startswith("exited with status 3 (last progress: warm-up step 1/1 done)")
    assert rows["fake-raise"]["error"] == "RuntimeError: fake device lost"
    assert any("fake device lost" in line for line in rows["fake-raise"]["log_tail"])
    assert "not plugged in" in rows["fake-missing"]["error"] and "pip install fake-driver" in rows["fake-missing"]["error"]

    cpu, accel = rows["cpu"], rows["fake-accel"]
    for r in (cpu, accel):
        assert len(r["losses"]) == 5  # every step's loss, warm-up included
        # 2 timed windows of 2 steps; step ms and tokens/s from the same windows
        assert r["repeat"] == 2 and len(r["window_step_s"]) == 2 and r["steps"] == 4
        assert r["step_time_s"]["p10"] <= r["step_time_s"]["median"] <= r["step_time_s"]["p90"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"]["median"])
        low, high = r["tokens_per_s_interval"]
        assert low == pytest.approx(r["tokens_per_step"] / r["step_time_s"]["p90"]) and low <= r["tokens_per_s"] <= high
        assert r["first_step_s"] > 0 and r["startup_s"] > 0 and r["memory"]["peak_bytes"] > 0
        assert r["versions"]["torch"]
    # same seed, same init, same data: the two CPU-math backends agree exactly
    assert accel["losses"] == cpu["losses"]
    assert accel["parity"] == {"reference": "cpu", "tolerance": 1e-3, "steps_compared": 5, "max_rel_diff": 0.0, "first_step_over": None}
    # MFU against the backend's claimed peak; cost from --price (USD per device-hour)
    assert cpu["mfu"] is None and cpu["usd_per_million_tokens"] is None
    assert accel["peak_flops"] == fakes.ACCEL_PEAK_FLOPS
    assert accel["mfu"] == pytest.approx(accel["tokens_per_s"] * accel["flops_per_token"] / fakes.ACCEL_PEAK_FLOPS)
    assert accel["usd_per_million_tokens"] == pytest.approx(3.6 / 3600 / accel["tokens_per_s"] * 1e6)

    with open(out["csv"]) as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["ok", "crashed", "ok", "failed", "unavailable"]
    with open(out["md"]) as fh:
        assert "| fake-crash | crashed |" in fh.read()
    with open(out["png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "fake-crash: crashed: exited with status 3" in stdout


def test_a_hung_backend_is_killed_at_the_timeout_and_the_next_one_runs(fakes, tmp_path):
    started = time.perf_counter()
    code, _, err = run_cli("bench", *FAST, "--backends", "fake-hang,cpu", "--timeout", "20", "--json", str(tmp_path / "b.json"))
    elapsed = time.perf_counter() - started
    assert code == 1, err
    with open(tmp_path / "b.json") as fh:
        rows = _rows(json.load(fh))
    assert rows["fake-hang"]["status"] == "timeout"
    assert rows["fake-hang"]["error"].startswith("no result within --timeout 20 s, killed")
    assert rows["cpu"]["status"] == "ok" and rows["cpu"]["parity"]["reference"] == "cpu"
    assert elapsed < 20 + 60
