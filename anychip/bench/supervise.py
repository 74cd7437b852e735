"""The parent side of ``anychip bench``: one row per process, started, watched and stopped here.

``anychip bench`` never runs a backend in its own process: it starts the child of
:mod:`anychip.bench.measure` once per row, one after the other (running them side by side
would make them compete for the host and distort every timing). A row with ``nproc`` N > 1
starts the same module under torchrun (``python -m torch.distributed.run --standalone
--nproc-per-node N -m anychip.bench.measure ...``). A crash, an out-of-memory kill or a hang
therefore ends one row, not the run, and ``--timeout`` can kill a row together with every
process it started (each child leads its own session, so a terminal Ctrl-C reaches only the
parent, which stops the child itself and still writes the rows that finished).

Events arrive on a UNIX socket in a private temporary directory (mode 0700: only this user can
connect); stdout and stderr (torchrun's and every rank's) go to a log whose tail explains a
crash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Callable

from anychip.backends import load_plugins
from anychip.bench.measure import BENCH_PID_ENV, RunSpec

LOG_TAIL_LINES = 15
# The directory that holds the anychip package: children import this anychip, not another one.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Outcome:
    """What the parent learnt about one child."""

    status: str  # ok | failed | crashed | timeout | interrupted
    measured: dict | None = None  # the child's result row
    ready: dict | None = None  # the child's "ready" event (device facts), when it got that far
    error: str | None = None
    log_tail: list[str] = dataclasses.field(default_factory=list)
    startup_s: float | None = None  # spawn -> backend ready (interpreter, imports, device init)
    wall_s: float = 0.0
    exit_code: int | None = None


# A launcher's variables: a bench row is a run of its own, so a bench started inside another
# launch (a shell where torchrun or jax.distributed set these) must not hand them to its children.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
              "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "JAX_COORDINATOR_ADDRESS",
              "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Every process of one row carries RUN_ENV=<token> in its environment, so a timeout can find
# and kill all of them: torchrun starts each worker in a session of its own, out of reach of
# the launcher's process group (torch/distributed/elastic/multiprocessing/subprocess_handler).
RUN_ENV = "ANYCHIP_BENCH_RUN"


def _child_env(token: str, nproc: int = 1) -> dict[str, str]:
    """The parent's environment, with this anychip and the plug-in modules importable, no
    launcher variables, the row's token and the bench's pid. An N-process row without
    OMP_NUM_THREADS gets CPUs // N intra-op threads per process: torchrun would give each
    rank 1, while the 1-process row it is compared with uses every core."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("TORCHELASTIC_")}
    roots = [_PACKAGE_ROOT] + load_plugins()
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + existing))
    env[RUN_ENV] = token
    env[BENCH_PID_ENV] = str(os.getpid())
    if nproc > 1 and "OMP_NUM_THREADS" not in env:  # torchrun keeps a value already set
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env


def _processes_of(token: str) -> list[int]:
    """Pids of the processes whose environment carries this row's token (Linux ``/proc``; an
    empty list elsewhere, where the process group and the children's parent watch remain)."""
    needle = f"{RUN_ENV}={token}".encode()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or another user's
            continue
    return found


def _kill_all(proc: subprocess.Popen, token: str) -> None:
    """SIGKILL the child's process group and the group of every process of this row (torchrun
    workers and whatever they started), never this process's own group."""
    own = os.getpgrp()
    groups = {proc.pid}
    for _ in range(3):  # again, for anything started while the first pass ran
        pids = _processes_of(token)
        for pid in pids:
            try:
                groups.add(os.getpgid(pid))
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for group in groups - {own}:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not pids:
            break


def _kill(proc: subprocess.Popen, token: str) -> None:
    _kill_all(proc, token)
    proc.wait()


def _tail(log) -> list[str]:
    log.seek(0)
    lines = log.read().decode("utf-8", "replace").splitlines()
    return [line for line in lines if line.strip()][-LOG_TAIL_LINES:]


def _describe_exit(code: int, nproc: int = 1) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    if nproc > 1:  # torchrun's own status says only that a worker failed, not how
        return f"torchrun exited with status {code}: a rank failed (see the log tail)"
    return f"exited with status {code}"


def launch_command(spec: RunSpec, events: str) -> list[str]:
    """The command of one row: the measuring child, under torchrun when ``spec.nproc`` > 1
    (``--standalone``: a rendezvous on this host at a free port, so rows never collide)."""
    child = ["-m", "anychip.bench.measure", "--spec", spec.to_json(), "--events", events]
    if spec.nproc == 1:
        return [sys.executable, *child]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(spec.nproc), *child]


def _socket_dir() -> str | None:
    """Where the event socket goes: the temporary directory, unless its path is too long for a
    UNIX socket address (108 bytes on Linux, 104 on macOS)."""
    return "/tmp" if len(tempfile.gettempdir()) > 64 and os.path.isdir("/tmp") else None


def run_backend(spec: RunSpec, timeout: float, on_event: Callable[[dict], None] = lambda e: None) -> Outcome:
    """Run one row in a fresh process (a torchrun launch when ``spec.nproc`` > 1); never raises
    for the child's sake (KeyboardInterrupt excepted: the child is killed first, then it
    propagates)."""
    with tempfile.TemporaryDirectory(prefix="anychip-bench-", dir=_socket_dir()) as tmp:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path = os.path.join(tmp, "events")
            listener.bind(path)  # the directory is private (mode 0700): only this user can connect
            listener.listen(1)
            return _run(spec, timeout, on_event, listener, path)
        finally:
            listener.close()


def _run(spec: RunSpec, timeout: float, on_event, listener: socket.socket, path: str) -> Outcome:
    log = tempfile.TemporaryFile()
    started = time.perf_counter()
    token = uuid.uuid4().hex
    try:
        proc = subprocess.Popen(
            launch_command(spec, path), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=_child_env(token, spec.nproc),
        )
    except OSError as exc:
        log.close()
        return Outcome("failed", error=f"cannot start {sys.executable}: {exc}")
    conn = None  # rank 0's connection, once it made it
    outcome = Outcome("crashed")
    last_step = "start-up"
    buffer = b""

    def handle(line: bytes) -> None:
        nonlocal last_step
        try:
            event = json.loads(line)
        except ValueError:
            return
        kind = event.get("event")
        if kind == "ready":
            outcome.ready = event
            outcome.startup_s = time.perf_counter() - started
            last_step = "backend ready, before the first step"
        elif kind == "step":
            last_step = f"{'warm-up' if event['phase'] == 'warmup' else 'timed'} step {event['done']}/{event['total']} done"
        elif kind == "result":
            outcome.measured = event["row"]
        elif kind == "error":
            outcome.error = event.get("error")
        on_event(event)

    try:
        with log:
            eof = False
            while not eof:
                remaining = started + timeout - time.perf_counter()
                if remaining <= 0:
                    _kill(proc, token)
                    outcome.status = "timeout"
                    outcome.error = f"no result within --timeout {timeout:g} s, killed (last progress: {last_step})"
                    outcome.log_tail = _tail(log)
                    break
                readable, _, _ = select.select([conn or listener], [], [], min(remaining, 0.25))
                if readable and conn is None:
                    conn, _ = listener.accept()
                elif readable:
                    chunk = conn.recv(1 << 16)
                    eof = not chunk
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        handle(line)
                elif proc.poll() is not None:
                    eof = True  # exited (before connecting, or a grandchild holds the socket): nothing more will come
            else:
                try:
                    outcome.exit_code = proc.wait(timeout=max(1.0, started + timeout - time.perf_counter()))
                except subprocess.TimeoutExpired:
                    _kill(proc, token)
                    outcome.exit_code = proc.returncode
                # Helpers may be left (compile workers, torchrun workers): they go with the row.
                _kill_all(proc, token)
                if outcome.measured is not None:
                    outcome.status = "ok"
                elif outcome.error is not None:
                    outcome.status = "failed"
                else:
                    outcome.status = "crashed"
                    outcome.error = f"{_describe_exit(outcome.exit_code, spec.nproc)} (last progress: {last_step})"
                if outcome.status != "ok":
                    outcome.log_tail = _tail(log)
    except KeyboardInterrupt:
        _kill(proc, token)
        raise
    finally:
        if conn is not None:
            conn.close()
        outcome.wall_s = time.perf_counter() - started
    return outcome
