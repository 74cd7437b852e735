"""Faults injected into `anychip bench`: whatever a worker does, and whatever signal reaches the
bench, the rows that finished are written, every faulty row says what happened in one line, the
exit status says how the run ended, and no process of the run is left.

The real CLI runs as a subprocess with the test-only backends of tests/bench/anychip_bench_fakes.py.
Five benches run side by side to keep the time down (a row's time is mostly its interpreter
start-up, and a timeout is time the CPU is free): the fault rows of :data:`FAULTS` in two
(:data:`FAULT_RUNS`: the two that wait out the timeout apart from the rest), each with a ``cpu``
row that must finish, and one per stop request of :data:`STOPS`, sent while that bench's
``fake-hang`` row hangs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from anychip.bench import events, processes, schema, supervise

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 20  # s per row: well above a healthy row's time on a loaded 2-core machine
# What anychip_bench_fakes reads (not imported here: importing it registers its backends in this process).
RUN_ID_ENV, HANG_MARKER_ENV = "ANYCHIP_FAKE_RUN_ID", "ANYCHIP_FAKE_HANG_MARKER"
AFTER_WARMUP = "(last progress: warm-up step 1/1 done)"

# Every fault row: the status it must end with, and what its one-line error says.
FAULTS = {
    "fake-hang-noterm": ("timeout", f"no result within --timeout {TIMEOUT} s, killed {AFTER_WARMUP}"),
    "fake-memory": ("timeout", f"no result within --timeout {TIMEOUT} s, killed {AFTER_WARMUP}"),
    "fake-segv": ("crashed", f"killed by SIGSEGV {AFTER_WARMUP}"),
    "fake-abort": ("crashed", f"killed by SIGABRT {AFTER_WARMUP}"),
    "fake-garbage": ("crashed", f"exited with status 7 {AFTER_WARMUP}"),
    "fake-escape": ("ok", None),  # the row finishes; the process it left in a session of its own must not outlive the run
    "fake-event-notjson": ("failed", "malformed event from the worker, killed: not JSON: b'this is not json'"),
    "fake-event-nophase": ("failed", "malformed event from the worker, killed: 'step' event without 'phase': "),
    "fake-event-rowstr": ("failed", "malformed event from the worker, killed: 'result' event has row='fast', expected object: "),
    "fake-event-array": ("failed", "malformed event from the worker, killed: a JSON array, not an object: "),
    "fake-event-number": ("failed", "malformed event from the worker, killed: a JSON number, not an object: b'42'"),
    "fake-event-binary": ("failed", "malformed event from the worker, killed: not UTF-8: "),
}
# The bench runs with faults: the finished row before the faults (a fault must not lose it)
# and after them (nor stop the run).
_WAITING = [name for name, (status, _) in FAULTS.items() if status == "timeout"]
FAULT_RUNS = {"quick": ["cpu", *(name for name in FAULTS if name not in _WAITING)], "timeouts": [*_WAITING, "cpu"]}
# Stop requests sent to a bench of cpu,fake-hang,fake-accel while fake-hang hangs: the signals
# (SPACING apart), the exit status and how the rows name the first signal. The storm (None)
# repeats SIGINT until the bench has written its last output file: through the whole clean-up
# and the writing, wherever they are when a signal lands.
SPACING = 0.02
STOPS = {
    "sigint": ((signal.SIGINT,), 130, "SIGINT (Ctrl-C)"),
    "double-sigint": ((signal.SIGINT, signal.SIGINT), 130, "SIGINT (Ctrl-C)"),
    "sigterm": ((signal.SIGTERM,), 143, "SIGTERM"),
    "sighup": ((signal.SIGHUP,), 129, "SIGHUP"),
    "sigint-storm": (None, 130, "SIGINT (Ctrl-C)"),
}

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts the run's processes in /proc")


def _alive(pid: int) -> bool:
    """Running (a zombie is not: it waits for a parent that may be a container's init that never reaps)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _leftovers(run_id: str) -> list[int]:
    """Live processes of one bench run: every one carries RUN_ID_ENV in its environment, but for
    fake-escape's sleep, which has no environment and carries the id in its argv."""
    entry, argv = f"{RUN_ID_ENV}={run_id}".encode(), f"300.{run_id}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                mine = argv in fh.read().split(b"\0")
            if not mine:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    mine = entry in fh.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if mine and _alive(int(pid)):
            found.append(int(pid))
    return found


class _Bench:
    """``anychip bench`` as a subprocess, its output in files (four of them run at once: a full
    pipe would stall one)."""

    def __init__(self, folder, backends: list[str]):
        folder.mkdir()
        self.folder = folder
        self.run_id = str(100_000_000 + int.from_bytes(os.urandom(4), "big") % 900_000_000)
        self.marker = folder / "pids"
        self.out = {ext: folder / f"bench.{ext}" for ext in ("json", "csv", "md")}
        env = {k: v for k, v in os.environ.items() if k not in supervise.LAUNCH_ENV}
        env.update({"ANYCHIP_PLUGINS": "anychip_bench_fakes", "PYTHONPATH": os.pathsep.join([HERE, env.get("PYTHONPATH", "")]),
                    RUN_ID_ENV: self.run_id, HANG_MARKER_ENV: str(self.marker)})
        argv = ["--workload", "mlp", "--steps", "2", "--repeat", "1", "--warmup", "1", "--precision", "fp32", "--timeout", str(TIMEOUT),
                "--backends", ",".join(backends)]
        for ext, path in self.out.items():
            argv += [f"--{ext}", str(path)]
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            # SIGINT as a terminal delivers it, even where this test runs with SIGINT ignored (a
            # shell's background job), which the bench would inherit and keep.
            self.proc = subprocess.Popen([sys.executable, "-m", "anychip.cli", "bench", *argv], stdout=out, stderr=err, env=env,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.left: list[int] = []

    def stop(self, signals: tuple[int, ...] | None) -> None:
        """Send ``signals`` SPACING apart; None: SIGINT until the last output file is there (10 s at most)."""
        until = time.monotonic() + 10
        for i, sig in enumerate(signals or iter(lambda: signal.SIGINT, None)):
            if i:
                time.sleep(SPACING)
            if self.proc.poll() is not None or (signals is None and (self.out["md"].exists() or time.monotonic() > until)):
                return
            self.proc.send_signal(sig)

    def pids(self) -> list[int]:
        """What the hanging rows (and fake-escape, for its sleep) wrote to the marker."""
        return [int(p) for p in self.marker.read_text().split()] if self.marker.exists() else []

    def finish(self, deadline: float) -> None:
        try:
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        # Briefly: a SIGKILLed process is gone a moment after the signal.
        until = time.monotonic() + 3
        while _leftovers(self.run_id) and time.monotonic() < until:
            time.sleep(0.05)
        self.left = _leftovers(self.run_id)
        self.stdout = (self.folder / "stdout").read_text(errors="replace")
        self.stderr = (self.folder / "stderr").read_text(errors="replace")
        self.doc = json.loads(self.out["json"].read_text()) if self.out["json"].exists() else None

    def rows(self) -> dict[str, dict]:
        assert self.doc is not None, f"no --json written (exit status {self.proc.returncode}): {self.stderr[-2000:]}"
        return {r["backend"]: r for r in self.doc["rows"]}

    def clean_up(self) -> None:
        """What a failed run left (the sleep lasts 300 s, the hangs 120 s)."""
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in _leftovers(self.run_id):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    """The fault runs and one bench per stop request, run side by side, all finished."""
    root = tmp_path_factory.mktemp("faults")
    fault_runs = {name: _Bench(root / name, backends) for name, backends in FAULT_RUNS.items()}
    stops = {name: _Bench(root / name, ["cpu", "fake-hang", "fake-accel"]) for name in STOPS}
    everything = [*fault_runs.values(), *stops.values()]
    try:
        deadline = time.monotonic() + 2 * TIMEOUT + 240
        waiting = dict(stops)
        while waiting and time.monotonic() < deadline:
            for name, bench in list(waiting.items()):
                if bench.pids() or bench.proc.poll() is not None:  # its fake-hang row hangs (or it ended: the test says so)
                    bench.stop(STOPS[name][0])
                    del waiting[name]
            time.sleep(0.05)
        for bench in everything:
            bench.finish(deadline)
        yield fault_runs, stops
    finally:
        for bench in everything:
            bench.clean_up()


def _run_of(fault_runs, name: str) -> "_Bench":
    return next(bench for key, bench in fault_runs.items() if name in FAULT_RUNS[key])


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("fault_run", list(FAULT_RUNS))
def test_the_finished_rows_survive_every_fault(benches, fault_run):
    bench = benches[0][fault_run]
    assert bench.proc.returncode == 1, bench.stderr[-3000:]  # rows failed: 1, as for any failed row
    rows = bench.rows()
    assert [r["backend"] for r in bench.doc["rows"]] == FAULT_RUNS[fault_run]
    assert schema.validate(bench.doc) == [] and bench.doc["interrupted"] is False
    for name in ("cpu", "fake-escape"):
        if name in rows:
            row = rows[name]
            assert row["status"] == "ok" and row["error"] is None
            assert row["tokens_per_s"] > 0 and row["memory"]["peak_bytes"] > 0
            assert len(row["losses"]) == 3 and len(row["window_step_s"]) == 1
            assert row["losses"] == rows["cpu"]["losses"]  # the same CPU math
    with open(bench.out["csv"]) as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == [rows[n]["status"] for n in FAULT_RUNS[fault_run]]
    markdown = bench.out["md"].read_text()
    assert all(f"| {name} | {rows[name]['status']} |" in markdown for name in FAULT_RUNS[fault_run])


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("name", list(FAULTS))
def test_each_fault_row_has_its_status_and_a_one_line_error(benches, name):
    bench = _run_of(benches[0], name)
    row = bench.rows()[name]
    status, error = FAULTS[name]
    assert row["status"] == status, row["error"]
    if error is None:
        assert row["error"] is None
    else:
        assert row["error"].startswith(error) and "\n" not in row["error"] and len(row["error"]) < 200, row["error"]
        assert f"{name}: {status}: {row['error'][:30]}" in " ".join(bench.stdout.split())  # the table's notes
    if name == "fake-garbage":  # the garbage went to the log, whose tail the row keeps (the forged result line did nothing)
        assert any("\ufffd" in line for line in row["log_tail"]) and all(len(line) <= 1003 for line in row["log_tail"])


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("fault_run, marked", [("quick", 1), ("timeouts", 2)])
def test_no_process_of_a_fault_run_is_left(benches, fault_run, marked):
    bench = benches[0][fault_run]
    # the hanging rows and fake-escape's sleep wrote their pids: they ran, and they are gone
    assert len(bench.pids()) == marked and not any(_alive(p) for p in bench.pids())
    assert bench.left == []


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("stop", list(STOPS))
def test_a_stop_request_writes_what_finished_and_leaves_no_process(benches, stop):
    _, stops = benches
    bench = stops[stop]
    _, code, reason = STOPS[stop]
    assert bench.proc.returncode == code, bench.stderr[-3000:]
    rows = bench.rows()
    assert bench.doc["interrupted"] is True and schema.validate(bench.doc) == []
    assert rows["cpu"]["status"] == "ok" and rows["cpu"]["tokens_per_s"] > 0 and len(rows["cpu"]["losses"]) == 3
    assert (rows["fake-hang"]["status"], rows["fake-hang"]["error"]) == ("interrupted", f"interrupted ({reason}); the backend was stopped")
    assert (rows["fake-accel"]["status"], rows["fake-accel"]["error"]) == ("skipped", f"not run: interrupted ({reason})")
    assert bench.out["md"].exists() and bench.out["csv"].exists() and "interrupted" in bench.stdout
    (hung,) = bench.pids()
    assert not _alive(hung) and bench.left == []


# -- the pieces, without a bench run -----------------------------------------------------------


def _event(kind: str, **fields) -> bytes:
    return json.dumps({"event": kind, **fields}).encode()


ROW = {"device_kind": "cpu", "devices": 1, "devices_used": 1, "devices_per_process": 1, "world_size": 1, "parallel": None,
       "layout": {"engine": None, "world_size": 1, "rank": 0, "local_rank": 0, "local_world_size": 1, "coordinator": None,
                  "nodes": 1}, "cpu_threads": 2, "versions": {"torch": "2.13.0"}, "setup_s": 0.1,
       "first_step_s": 0.2, "warmup_s": 0.2, "window_step_s": [0.01, 0.02], "window_steps": 2, "tokens_per_step": 64,
       "samples_per_step": 64, "batch": 64, "seq": 1, "flops_per_token": 1e3, "peak_flops": None,
       "memory": {"peak_bytes": 1, "current_bytes": None, "source": "process RSS"}, "losses": [2.0, float("nan")]}


def test_well_formed_events_pass():
    for line in (_event("ready", device_kind="x", devices=None, versions={"torch": "2"}, layout=None),
                 _event("step", phase="timed", done=1, total=2), _event("error", error="E: boom"), _event("result", row=ROW)):
        event, problem = events.parse(line)
        assert problem is None and event == json.loads(line)


@pytest.mark.parametrize("line, reason", [
    (b"this is not json", "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "a JSON array, not an object"),
    (b"42", "a JSON number, not an object"),
    (b"NaN", "a JSON number, not an object"),
    (b"[" * 100_000, "not JSON"),  # too deep for the parser
    (b'{"event": "step", "done": 1, "total": 1}', "'step' event without 'phase'"),
    (b'{"event": "step", "phase": "cooldown", "done": 1, "total": 1}', "'step' event has phase='cooldown', expected phase"),
    (b'{"event": "step", "phase": "timed", "done": true, "total": 1}', "'step' event has done=True, expected int"),
    (b'{"event": "result", "row": "fast"}', "'result' event has row='fast', expected object"),
    (b'{"event": "result", "row": {}}', "result row without 'device_kind'"),
    (b'{"event": "ready", "devices": 1, "versions": {}, "layout": null}', "'ready' event without 'device_kind'"),
    (b'{"event": "error", "error": 3}', "'error' event has error=3, expected str"),
    (b'{"event": "ready", "device_kind": "x", "devices": 1, "versions": {}, "layout": {}}',
     "'ready' event has layout={}, expected layout|null"),
    (b'{"event": 7}', "unknown event kind 7"),
    (b'{"event": "done"}', "unknown event kind 'done'"),
])
def test_a_malformed_event_is_one_short_reason(line, reason):
    assert events.parse(line) == (None, reason)


@pytest.mark.parametrize("key, value", [("window_step_s", []), ("window_step_s", [0.0]), ("setup_s", float("inf")),
                                        ("window_steps", 0), ("memory", {"peak_bytes": 1}),
                                        ("versions", {"torch": 2}), ("layout", {"nested": {"a": 1}}), ("losses", "low")])
def test_a_result_row_the_report_cannot_use_is_refused(key, value):
    event, problem = events.parse(json.dumps({"event": "result", "row": {**ROW, key: value}}).encode())
    assert event is None and problem.startswith(f"result row has {key}=")


@needs_proc
def test_the_sweep_takes_an_orphan_in_a_session_of_its_own_and_spares_older_children():
    """What the bench does after each row, here inside the test process (which becomes the
    subreaper for the block): a worker's child that left its session and its environment is
    found once it is orphaned; a child that was there before is left alone."""
    older = subprocess.Popen(["sleep", "60"])
    orphan = None
    try:
        with processes.subreaper() as active:
            assert active
            before = processes.children()
            assert older.pid in before
            code = ("import subprocess; print(subprocess.Popen(['sleep', '60'], start_new_session=True, env={}, "
                    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
            orphan = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            assert _alive(orphan) and orphan in processes.children()  # its parent exited: re-parented to this process
            assert processes.sweep(before) == 1
            assert not _alive(orphan) and orphan not in processes.children()  # killed and reaped, not a zombie
        assert older.poll() is None
    finally:
        older.kill()
        older.wait()
        if orphan and _alive(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_the_callback_sees_only_checked_events():
    seen = []
    watch = supervise._Watch(0.0, seen.append)
    assert watch.take(b'{"event": "step", "done": 1, "total": 1}') == (
        "'step' event without 'phase': b'{\"event\": \"step\", \"done\": 1, \"total\": 1}'")
    assert watch.take(b"[" * 100) == "not JSON: b'" + "[" * 48 + "'..."  # the excerpt stays short
    assert seen == [] and watch.last_step == "start-up"
    assert watch.take(_event("step", phase="warmup", done=1, total=1)) is None
    assert seen == [{"event": "step", "phase": "warmup", "done": 1, "total": 1}] and watch.last_step == "warm-up step 1/1 done"
    assert watch.take(_event("error", error="\nRuntimeError: lost\ntraceback...")) is None
    assert watch.outcome.error == "RuntimeError: lost"  # one line
