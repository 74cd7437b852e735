"""`anychip bench --nproc`: rows launched through torchrun (gloo on the CPU), their scaling
efficiency, and a timeout or Ctrl-C that stops every process of such a row.

Each torchrun launch costs about 7 s on a 2-core machine, so these tests launch as few as they
can and check everything they can on each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from anychip.bench import schema, supervise

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc"),
]
HERE = os.path.dirname(os.path.abspath(__file__))


def _bench(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in supervise.LAUNCH_ENV}
    return subprocess.run([sys.executable, "-m", "anychip.cli", "bench", *argv], capture_output=True, text=True,
                          timeout=300, env={**clean, **(env or {})})


def _alive(pid: int) -> bool:
    """Running (a zombie is not: it waits for a parent that may be a container's init that never reaps)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _live_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds ``entry`` (NAME=value)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if entry.encode() in fh.read().split(b"\0") and _alive(int(pid)):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_nproc_1_2_on_the_cpu(tmp_path):
    out = tmp_path / "scaling.json"
    done = _bench("--workload", "mlp", "--backends", "cpu", "--nproc", "1,2", "--steps", "2", "--repeat", "2", "--warmup", "1",
                  "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert schema.validate(doc) == []
    one, two = doc["rows"]
    assert [(r["backend"], r["world_size"], r["parallel"], r["status"]) for r in doc["rows"]] == [
        ("cpu", 1, None, "ok"), ("cpu", 2, "ddp", "ok")]
    assert (doc["config"]["nproc"], doc["config"]["parallel"]) == ([1, 2], "ddp")
    assert doc["command"][doc["command"].index("--nproc") + 1] == "1,2"

    # where the ranks ran: rank 0's view, from the live process group
    assert one["layout"]["engine"] is None and one["layout"]["world_size"] == 1
    lay = two["layout"]
    assert (lay["engine"], lay["world_size"], lay["rank"], lay["local_world_size"], lay["nodes"]) == ("torchrun", 2, 0, 2, 1)
    assert lay["coordinator"]

    # weak scaling: each process keeps the batch (64), a 2-process step trains on 128 samples
    assert one["batch"] == two["batch"] == 64
    assert (one["samples_per_step"], two["samples_per_step"]) == (64, 128)
    assert two["tokens_per_step"] == 2 * one["tokens_per_step"]
    assert two["tokens_per_s"] == pytest.approx(two["tokens_per_step"] / two["step_time_s"]["median"])
    assert two["scaling_efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]), rel=1e-12)
    assert one["scaling_efficiency"] is None
    # two processes on one CPU: one device, counted once for MFU and cost; each rank gets half
    # the CPUs as intra-op threads unless OMP_NUM_THREADS says otherwise
    assert two["devices_used"] == 1
    assert two["cpu_threads"] == int(os.environ.get("OMP_NUM_THREADS") or max(1, os.cpu_count() // 2)) and one["cpu_threads"] >= 1
    assert "CPU threads per process: cpu " in done.stdout

    # different global batches: no loss comparison across process counts
    assert one["parity"]["reference"] == "cpu" and two["parity"]["reference"] == "cpu (nproc 2)"
    assert one["losses"] != two["losses"]
    assert "scaling eff." in done.stdout and "cpu (nproc 2): torchrun, 1 node(s) x 2 process(es)" in done.stdout

    # What the 2-process row trained is what one process trains on the global batch of 128
    # (DDP averages the two halves' gradients): the same losses, up to the all-reduce's rounding.
    out128 = tmp_path / "one128.json"
    done = _bench("--workload", "mlp", "--backends", "cpu", "--batch", "128", "--steps", "2", "--repeat", "2", "--warmup", "1",
                  "--json", str(out128))
    assert done.returncode == 0, done.stderr[-3000:]
    (single,) = json.loads(out128.read_text())["rows"]
    assert single["tokens_per_step"] == two["tokens_per_step"]
    assert two["losses"] == pytest.approx(single["losses"], rel=1e-5)


def _hung_torchrun_bench(marker, out) -> tuple[subprocess.Popen, list[int]]:
    """A bench whose one row (fake-hang, 2 processes) has both ranks stuck in a step; the
    ranks' pids. Every process of the run carries ANYCHIP_FAKE_HANG_MARKER=<marker>."""
    env = {k: v for k, v in os.environ.items() if k not in supervise.LAUNCH_ENV}
    env.update(ANYCHIP_FAKE_HANG_MARKER=str(marker), ANYCHIP_PLUGINS="anychip_bench_fakes",
               PYTHONPATH=os.pathsep.join([HERE, env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "anychip.cli", "bench", "--workload", "mlp", "--steps", "4", "--warmup", "1", "--precision", "fp32",
         "--backends", "fake-hang", "--nproc", "2", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        # A test suite started in the background (a CI job) inherits SIGINT ignored, and the
        # bench keeps an ignored SIGINT ignored, as a shell's background job must: start it
        # with the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if marker.exists() and len(marker.read_text().split()) == 2:
            break
        time.sleep(0.1)
    ranks = [int(p) for p in marker.read_text().split()] if marker.exists() else []
    return proc, ranks


def _kill_leftovers(entry: str) -> None:
    """What a failed test left running (the hanging ranks sleep 120 s)."""
    for pid in _live_with_env(entry):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ctrl_c_stops_every_rank_of_a_torchrun_row(tmp_path):
    marker = tmp_path / "hung.pids"
    out = tmp_path / "b.json"
    proc, ranks = _hung_torchrun_bench(marker, out)
    try:
        assert len(ranks) == 2, "both ranks should be stuck in the hanging step"
        assert all(_alive(p) for p in ranks)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr.decode()[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["status"], row["world_size"]) == ("interrupted", 2)
    # torchrun starts each rank in a session of its own: killing torchrun's process group
    # would leave them running. Every process that carries this run's environment is gone.
    assert not any(_alive(p) for p in ranks)
    assert _live_with_env(f"ANYCHIP_FAKE_HANG_MARKER={marker}") == []


def test_a_sigkilled_bench_leaves_no_rank_running(tmp_path):
    """SIGKILL gives the bench no chance to stop its row, and a rank's parent is torchrun, which
    outlives it: the ranks watch the bench's pid ($ANYCHIP_BENCH_PARENT) and exit, and torchrun
    follows its failed workers."""
    marker = tmp_path / "hung.pids"
    entry = f"ANYCHIP_FAKE_HANG_MARKER={marker}"
    proc, ranks = _hung_torchrun_bench(marker, tmp_path / "b.json")
    try:
        assert len(ranks) == 2, "both ranks should be stuck in the hanging step"
        proc.kill()
        proc.wait()  # reaped: a zombie still answers kill(pid, 0)
        deadline = time.monotonic() + 15  # the watch looks once a second; torchrun then stops
        while _live_with_env(entry) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _live_with_env(entry) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_leftovers(entry)


def test_n_process_rows_share_the_cpus_when_omp_num_threads_is_unset(monkeypatch):
    """torchrun alone would give each rank 1 thread, while the 1-process row uses every core."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert "OMP_NUM_THREADS" not in supervise._child_env("token", 1)  # torch's default: every core
    assert supervise._child_env("token", 2)["OMP_NUM_THREADS"] == "16"
    assert supervise._child_env("token", 64)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice holds for every row (torchrun keeps it too)
    assert supervise._child_env("token", 2)["OMP_NUM_THREADS"] == "3"


def test_a_failed_torchrun_row_says_a_rank_failed():
    assert supervise._describe_exit(1, nproc=2) == "torchrun exited with status 1: a rank failed (see the log tail)"
    assert supervise._describe_exit(1) == "exited with status 1"
    assert supervise._describe_exit(-signal.SIGKILL, nproc=2) == "killed by SIGKILL (out of memory?)"


def test_a_kill_reaches_processes_in_other_sessions():
    """What a timeout does to a row: the child's group and every process carrying the row's
    token, wherever it runs (a torchrun worker leads its own session)."""
    token = "test-" + os.urandom(8).hex()
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, env={**os.environ, supervise.RUN_ENV: token})
    try:
        deadline = time.monotonic() + 30
        while len(_live_with_env(f"{supervise.RUN_ENV}={token}")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = _live_with_env(f"{supervise.RUN_ENV}={token}")
        assert len(pids) == 2
        supervise._kill(proc, token)
        assert proc.returncode == -signal.SIGKILL
        time.sleep(0.2)  # SIGKILL is delivered asynchronously to the other session
        assert [p for p in pids if _alive(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _live_with_env(f"{supervise.RUN_ENV}={token}"):  # what a failed kill left behind
            os.kill(pid, signal.SIGKILL)
