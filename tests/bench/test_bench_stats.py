"""The statistics of a bench row: step ms and tokens/s from the same timed windows (median and
p10-p90), the warnings that say when figures are not worth comparing (a loaded machine, a wide
spread), and the one parity reference (--reference, cpu by default). Synthetic measurements
only: no timing is asserted here."""

from __future__ import annotations

import json
import os

import pytest
from bench_support import one_line, run_cli

from anychip.bench import metrics, schema, supervise
from anychip.bench.report.cells import fmt_step, fmt_tokens

WINDOWS = [0.012, 0.010, 0.011, 0.013, 0.010]  # seconds per step of five windows


def _measured(windows=WINDOWS, losses=(3.0, 2.0, 1.0), **over):
    m = {
        "device_kind": "x", "devices": 1, "devices_used": 1, "versions": {"torch": "2.13.0"}, "setup_s": 0.1,
        "first_step_s": 0.5, "warmup_s": 0.5, "window_step_s": list(windows), "window_steps": 20, "tokens_per_step": 512,
        "samples_per_step": 8, "batch": 8, "seq": 64, "flops_per_token": 1e6, "peak_flops": None,
        "memory": {"peak_bytes": 10, "current_bytes": 5, "source": "process RSS"}, "losses": list(losses),
    }
    m.update(over)
    return m


def _row(backend="cpu", windows=WINDOWS, status="ok", **measured):
    row = metrics.empty_row(backend, status, None if status == "ok" else "boom", "fp32")
    return metrics.finish_row(row, _measured(windows, **measured), warmup=1) if status == "ok" else row


def test_step_ms_and_tokens_per_second_agree_because_they_come_from_the_same_windows():
    row = _row()
    # sorted 0.010 0.010 0.011 0.012 0.013: median 0.011; p10 at 0.4 -> 0.010; p90 at 3.6 -> 0.0126
    assert row["step_time_s"] == pytest.approx({"median": 0.011, "p10": 0.010, "p90": 0.0126, "mean": 0.0112, "min": 0.010, "max": 0.013})
    assert row["repeat"] == 5 and row["steps"] == 100 and row["window_step_s"] == WINDOWS
    assert row["tokens_per_s"] == pytest.approx(512 / 0.011)
    assert row["tokens_per_s"] * row["step_time_s"]["median"] == pytest.approx(row["tokens_per_step"], rel=1e-12)
    assert row["tokens_per_s_interval"] == pytest.approx([512 / 0.0126, 512 / 0.010])
    assert row["samples_per_s"] == pytest.approx(8 / 0.011) and row["samples_per_s_interval"] == pytest.approx([8 / 0.0126, 800])
    # the table: 11.00 ms and 512 / 0.011 = 46,545 tokens/s; ± = (51,200 - 40,635) / 2 / 46,545 = 11 %
    assert fmt_step(row) == "11.00" and fmt_tokens(row) == "46,545 ±11%"


def test_one_slow_window_moves_the_spread_not_the_median():
    calm = _row(windows=[0.010, 0.010, 0.010, 0.010, 0.010])
    burst = _row(windows=[0.010, 0.010, 0.010, 0.010, 0.030])  # another job took the CPU during one window
    assert burst["step_time_s"]["median"] == calm["step_time_s"]["median"] == 0.010
    assert burst["tokens_per_s"] == calm["tokens_per_s"] and burst["tokens_per_s_interval"][0] < calm["tokens_per_s_interval"][0]


def test_a_load_above_the_cores_is_a_warning():
    assert metrics.run_warnings([], {"cores": 2, "max_1min": 3.5}) == [
        "the machine was loaded: 1-minute load average up to 3.50 on 2 cores; "
        "other work shared the CPUs, so the timings are slower and noisier than on an idle machine"]
    assert metrics.run_warnings([], {"cores": 2, "max_1min": 2.0}) == []
    assert metrics.run_warnings([], None) == []


def test_a_wide_spread_is_a_warning_with_its_figure():
    wide = _row("jax:cpu", windows=[0.10, 0.10, 0.10, 0.10, 0.15])  # p10 0.10, p90 0.13: 30 % of the median 0.10
    narrow = _row(windows=[0.100, 0.101, 0.102, 0.103, 0.104])  # (0.1036 - 0.1004) / 0.102: 3 %
    failed = _row("fake-crash", status="crashed")
    assert metrics.run_warnings([narrow, wide, failed], {"cores": 2, "max_1min": 0.5}) == [
        "jax:cpu: step time p10-p90 spans 30% of the median over 5 windows (above 10%): noisy; "
        "rerun on an idle machine, or raise --steps or --repeat"]


# -- the command -------------------------------------------------------------------------------


@pytest.fixture
def no_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backend was started although the input was bad")

    monkeypatch.setattr(supervise, "run_backend", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--repeat", "0"], "--repeat: must be >= 1, got 0"),
    (["--repeat", "two"], "--repeat: expected a whole number"),
    (["--backends", "cpu", "--reference", "nosuch"], "--reference nosuch: not among the backends compared (cpu)"),
    (["--backends", "cpu,fake-missing", "--reference", "fake-missing"], "--reference fake-missing: fake-missing is unavailable"),
    (["--rtol", "0"], "must be > 0"),
])
def test_bad_repeat_or_reference_is_one_line_exit_2(fakes, no_runs, argv, message):
    code, out, err = run_cli("bench", *argv)
    assert code == 2 and out == ""
    assert message in one_line(err)


def _fake_runs(monkeypatch, losses: dict[str, list[float]], load: float):
    """Every row 'runs' at once with these losses; the load average reads ``load``."""
    def run_backend(spec, timeout, on_event):
        ready = {"device_kind": "x", "devices": 1, "versions": {"torch": "2.13.0"}, "layout": None}
        return supervise.Outcome("ok", measured=_measured(losses=losses[spec.backend]), ready=ready, startup_s=0.1, wall_s=1.0)

    monkeypatch.setattr(supervise, "run_backend", run_backend)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))


def test_parity_is_against_cpu_by_default_and_against_reference_when_named(fakes, monkeypatch, tmp_path):
    cores = os.cpu_count()
    _fake_runs(monkeypatch, {"fake-accel": [3.0, 2.1, 1.0], "cpu": [3.0, 2.0, 1.0]}, load=cores + 1.5)
    out = tmp_path / "run.json"
    code, stdout, err = run_cli("bench", "--backends", "fake-accel,cpu", "--precision", "fp32", "--json", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == []
    assert doc["config"]["reference"] == "cpu" and doc["config"]["repeat"] == 5
    accel, cpu = doc["rows"]
    assert cpu["parity"]["reference"] == "cpu" and cpu["parity"]["max_rel_diff"] == 0.0
    assert accel["parity"]["reference"] == "cpu" and accel["parity"]["max_rel_diff"] == pytest.approx(0.05)
    assert accel["parity"]["tolerance"] == 1e-3 and accel["parity"]["first_step_over"] == 2  # fp32's default
    # the load, before and after each row, and its warning: in the document, the footer and on stderr
    assert doc["machine"]["load"] == {"cores": cores, "max_1min": cores + 1.5}
    assert any(w.startswith("the machine was loaded") for w in doc["warnings"])
    assert "anychip bench: warning: the machine was loaded" in err and "warning: the machine was loaded" in stdout
    assert "--reference cpu --rtol 0.001" in " ".join(doc["command"])

    code, _, err = run_cli("bench", "--backends", "fake-accel,cpu", "--reference", "FAKE-ACCEL", "--rtol", "0.1", "--json", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["config"]["reference"] == "fake-accel" and doc["config"]["parity_tolerance"] == 0.1
    accel, cpu = doc["rows"]
    assert accel["parity"]["reference"] == "fake-accel" and cpu["parity"]["max_rel_diff"] == pytest.approx(0.1 / 2.1)
    assert cpu["parity"]["first_step_over"] is None


def test_without_cpu_the_first_backend_listed_is_the_reference(fakes, monkeypatch, tmp_path):
    _fake_runs(monkeypatch, {"fake-slow": [3.0, 2.0], "fake-accel": [3.0, 2.0]}, load=0.0)
    out = tmp_path / "run.json"
    code, _, err = run_cli("bench", "--backends", "fake-slow,fake-accel", "--json", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["config"]["reference"] == "fake-slow" and doc["rows"][1]["parity"]["reference"] == "fake-slow"
    assert doc["config"]["parity_tolerance"] == metrics.PARITY_TOLERANCE[doc["config"]["precision"]]
