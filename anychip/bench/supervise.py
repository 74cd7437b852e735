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
connect), each checked by :func:`anychip.bench.events.parse` before it is read; stdout and
stderr (torchrun's and every rank's) go to a log whose tail explains a crash. When a row ends,
however it ends, every process it started goes with it (:mod:`anychip.bench.processes`).
"""

from __future__ import annotations

import dataclasses
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
from anychip.bench import events, processes
from anychip.bench.measure import BENCH_PID_ENV, RunSpec

LOG_TAIL_LINES = 15
LOG_TAIL_BYTES = 64 << 10
LOG_LINE_CHARS = 1000
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
# A process that drops its environment is still found as an orphan of this one (processes.sweep).
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


def _kill_all(proc: subprocess.Popen, token: str) -> None:
    """SIGKILL the child's process group and the group of every process of this row (torchrun
    workers and whatever they started), never this process's own group."""
    own = os.getpgrp()
    groups = {proc.pid}
    for _ in range(3):  # again, for anything started while the first pass ran
        pids = processes.with_env(f"{RUN_ENV}={token}")
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
    """The last lines of the row's log, read from its end: a worker may have written gigabytes,
    or one endless line of binary garbage."""
    size = log.seek(0, os.SEEK_END)
    log.seek(max(0, size - LOG_TAIL_BYTES))
    lines = log.read().decode("utf-8", "replace").splitlines()
    lines = [line if len(line) <= LOG_LINE_CHARS else line[:LOG_LINE_CHARS] + "..." for line in lines if line.strip()]
    return lines[-LOG_TAIL_LINES:]


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


def launch_command(spec: RunSpec, events_path: str) -> list[str]:
    """The command of one row: the measuring child, under torchrun when ``spec.nproc`` > 1
    (``--standalone``: a rendezvous on this host at a free port, so rows never collide)."""
    child = ["-m", "anychip.bench.measure", "--spec", spec.to_json(), "--events", events_path]
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
    propagates). ``on_event`` sees only events that passed :func:`events.parse`; a malformed one
    fails the row (status "failed") and kills the child."""
    with tempfile.TemporaryDirectory(prefix="anychip-bench-", dir=_socket_dir()) as tmp:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path = os.path.join(tmp, "events")
            listener.bind(path)  # the directory is private (mode 0700): only this user can connect
            listener.listen(1)
            return _run(spec, timeout, on_event, listener, path)
        finally:
            listener.close()


def _excerpt(line: bytes) -> str:
    return repr(line[:48]) + ("..." if len(line) > 48 else "")


class _Watch:
    """What one row's events said so far. Each line is checked (:func:`events.parse`) before
    anything reads it, the caller's ``on_event`` included."""

    def __init__(self, started: float, on_event: Callable[[dict], None]):
        self.started = started
        self.on_event = on_event
        self.outcome = Outcome("crashed")
        self.last_step = "start-up"

    def take(self, line: bytes) -> str | None:
        """Record one event line; a reason (one line) when it is malformed."""
        event, problem = events.parse(line)
        if problem is not None:
            return f"{problem}: {_excerpt(line)}"
        kind = event["event"]
        if kind == "ready":
            self.outcome.ready = event
            self.outcome.startup_s = time.perf_counter() - self.started
            self.last_step = "backend ready, before the first step"
        elif kind == "step":
            self.last_step = f"{'warm-up' if event['phase'] == 'warmup' else 'timed'} step {event['done']}/{event['total']} done"
        elif kind == "result":
            self.outcome.measured = event["row"]
        else:  # error
            lines = [s.strip() for s in event["error"].splitlines() if s.strip()]
            self.outcome.error = lines[0] if lines else "the worker reported an error without a message"
        self.on_event(event)
        return None


def _run(spec: RunSpec, timeout: float, on_event, listener: socket.socket, path: str) -> Outcome:
    log = tempfile.TemporaryFile()
    started = time.perf_counter()
    token = uuid.uuid4().hex
    before = processes.children()  # not this row's: the sweep at its end leaves them alone
    try:
        proc = subprocess.Popen(
            launch_command(spec, path), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=_child_env(token, spec.nproc),
        )
    except OSError as exc:
        log.close()
        return Outcome("failed", error=f"cannot start {sys.executable}: {exc}")
    conn = None  # rank 0's connection, once it made it
    watch = _Watch(started, on_event)
    outcome = watch.outcome
    buffer = b""
    try:
        with log:
            eof = False
            while not eof:
                remaining = started + timeout - time.perf_counter()
                if remaining <= 0:
                    _kill(proc, token)
                    outcome.status = "timeout"
                    outcome.error = f"no result within --timeout {timeout:g} s, killed (last progress: {watch.last_step})"
                    outcome.log_tail = _tail(log)
                    break
                readable, _, _ = select.select([conn or listener], [], [], min(remaining, 0.25))
                if readable and conn is None:
                    conn, _ = listener.accept()
                elif readable:
                    chunk = conn.recv(1 << 16)
                    eof = not chunk
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    bad = next((reason for reason in map(watch.take, lines) if reason), None)  # stops at the first
                    if bad is None and len(buffer) > events.MAX_LINE:
                        bad = f"a line of over {events.MAX_LINE} bytes: {_excerpt(buffer)}"
                    if bad is not None:  # nothing it says can be trusted any more: the row fails, the run goes on
                        _kill(proc, token)
                        outcome.status = "failed"
                        outcome.error = f"malformed event from the worker, killed: {bad}"
                        outcome.log_tail = _tail(log)
                        break
                elif proc.poll() is not None:
                    eof = True  # exited (before connecting, or a grandchild holds the socket): nothing more will come
            else:
                try:
                    outcome.exit_code = proc.wait(timeout=max(1.0, started + timeout - time.perf_counter()))
                except subprocess.TimeoutExpired:
                    _kill(proc, token)
                    outcome.exit_code = proc.returncode
                if outcome.measured is not None:
                    outcome.status = "ok"
                elif outcome.error is not None:
                    outcome.status = "failed"
                else:
                    outcome.status = "crashed"
                    outcome.error = f"{_describe_exit(outcome.exit_code, spec.nproc)} (last progress: {watch.last_step})"
                if outcome.status != "ok":
                    outcome.log_tail = _tail(log)
    finally:
        # Also on KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the bench's CLI):
        # the child is killed first, then the exception propagates.
        if conn is not None:
            conn.close()
        if proc.poll() is None:
            _kill(proc, token)
        # Helpers may be left (compile workers, torchrun workers, a process in a session of its
        # own): they go with the row, found as the token's carriers and as orphans re-parented
        # to this process (the bench's CLI makes it a subreaper).
        _kill_all(proc, token)
        processes.sweep(before, f"{RUN_ENV}={token}")
        outcome.wall_s = time.perf_counter() - started
    return outcome
