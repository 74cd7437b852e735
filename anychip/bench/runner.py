"""One backend per process (per torchrun launch, for ``--nproc N`` rows).

``anychip bench`` never runs a backend in its own process: it starts
``python -m anychip.bench.runner --spec JSON --events SOCKET`` once per row, one after the
other (running them side by side would make them compete for the host and distort every
timing). A row with ``nproc`` N > 1 starts the same module under torchrun
(``python -m torch.distributed.run --standalone --nproc-per-node N -m anychip.bench.runner ...``):
every rank trains, rank 0 alone reports. A crash, an out-of-memory kill or a hang therefore ends
one row, not the run, and ``--timeout`` can kill a row together with every process it started
(each child leads its own session, so a terminal Ctrl-C reaches only the parent, which stops the
child itself and still writes the rows that finished).

The child reports on a channel of its own, so that whatever a library prints to stdout/stderr
cannot corrupt the protocol: a UNIX socket the parent listens on, in a private temporary
directory, named by ``--events``. A path and not an inherited file descriptor, because torchrun
passes no descriptors to the workers it starts; rank 0 connects, the other ranks never do. One
JSON object per line; stdout and stderr (torchrun's and every rank's) go to a log whose tail
explains a crash:

    {"event": "ready", "device_kind": ..., "devices": ..., "versions": {...}, "layout": {...}}
    {"event": "step", "phase": "warmup" | "timed", "done": k, "total": n}
    {"event": "result", "row": {...measurements...}}      or      {"event": "error", ...}

Test-only or third-party backends reach the child through ``ANYCHIP_PLUGINS``: a
comma-separated list of modules, imported in the parent and in every child before any backend
is looked up; importing one is expected to call :func:`anychip.backends.register`.

Same seed, same initial weights, same batches on every backend: the model is built on the
host from ``workload.build(seed)`` and every batch from ``workload.batch(step, ..., seed)``,
generated before the clock starts. Under torchrun every rank builds the same global batch
(``nproc`` x ``batch`` samples: weak scaling) and ``TrainStep(parallel=...)`` trains each rank
on its slice of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable

from anychip.backends import load_plugins

LOG_TAIL_LINES = 15


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one child measures. Everything a row must share with the others is in here."""

    backend: str
    workload: str
    steps: int
    warmup: int
    batch: int | None = None
    seq: int | None = None
    precision: str = "fp32"
    kernels: str = "auto"
    seed: int = 0
    lr: float = 1e-3
    nproc: int = 1  # processes; > 1: launched by torchrun, batch per process, N x batch per step
    parallel: str | None = None  # TrainStep(parallel=...) of an nproc > 1 row: "ddp" or "fsdp"

    def __post_init__(self) -> None:
        if not (isinstance(self.nproc, int) and self.nproc >= 1):
            raise ValueError(f"nproc must be an int >= 1, got {self.nproc!r}")
        if (self.parallel is None) != (self.nproc == 1):
            raise ValueError(f"nproc={self.nproc} needs parallel='ddp' or 'fsdp' exactly when nproc > 1, got {self.parallel!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))


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


# -- plug-ins -----------------------------------------------------------------------------------


# -- the child ----------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive: another user's process (the pid was reused)
        pass
    return False


def _watch_parent() -> None:
    """Exit when the parent or the bench goes away (killed with SIGKILL, say): a hung child must
    not outlive the run that started it. It leads its own session, so nothing else would stop
    it. Under torchrun a rank's parent is torchrun, which watches nothing: the ranks watch the
    bench (``$ANYCHIP_BENCH_PARENT``) and exit, and torchrun follows its failed workers."""
    parent = os.getppid()
    bench = int(os.environ.get(BENCH_PID_ENV) or 0)

    def watch():
        while True:
            if os.getppid() != parent or (bench and _gone(bench)):
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, name="anychip-bench-parent-watch", daemon=True).start()


def measure(spec: RunSpec, emit: Callable[..., None]) -> dict:
    """Build, warm up and time one backend; returns the measurement row."""
    import platform

    import anychip as ac
    from anychip import distributed, workloads

    load_plugins()
    world = distributed.world_size()
    if world != spec.nproc:
        raise RuntimeError(f"this row runs on {spec.nproc} process(es), but the launch has world size {world}")
    backend = ac.backend(spec.backend)
    import torch  # after the backend: some backends configure the environment torch reads

    versions = {"python": platform.python_version(), "anychip": ac.__version__, "torch": torch.__version__}
    versions.update(backend.availability.versions)
    emit("ready", device_kind=backend.device_kind, devices=backend.device_count, versions=versions,
         layout=distributed.layout().as_dict())

    t0 = time.perf_counter()
    workload = workloads.get(spec.workload)
    batch_size = spec.batch or workload.default_batch  # per process
    seq = spec.seq or workload.default_seq
    total = spec.warmup + spec.steps
    # Weak scaling: every rank builds the same global batch of world x batch samples and
    # TrainStep trains each on its slice (split_batches), so each process keeps `batch`.
    global_batch = batch_size * world
    batches = [workload.batch(i, global_batch, seq, spec.seed) for i in range(total)]
    model = workload.build(seed=spec.seed)
    flops_per_token = float(workload.flops_per_token(model, seq))
    schedule = ac.WarmupCosine(warmup=max(1, total // 10), total=total, min_ratio=0.1)
    step = ac.TrainStep(
        model,
        workload.loss_fn,
        ac.AdamW(lr=spec.lr, weight_decay=0.1, schedule=schedule),
        backend=backend,
        precision=spec.precision,
        max_grad_norm=1.0,
        kernels=spec.kernels,
        parallel=spec.parallel,
    )
    setup_s = time.perf_counter() - t0

    # Warm-up: compilation (torch.compile, jax.jit, Neuron) happens here and is reported
    # separately from the steady state.
    outputs, warm_times = [], []
    for i in range(spec.warmup):
        t = time.perf_counter()
        outputs.append(step(batches[i]))
        backend.synchronize()
        warm_times.append(time.perf_counter() - t)
        emit("step", phase="warmup", done=i + 1, total=spec.warmup)

    if world > 1:
        distributed.barrier()  # the ranks leave warm-up at different times; start the clock together
    backend.reset_peak_memory()
    # Two views of the steady state. First half: a throughput window, steps back to back and
    # one synchronisation at its end, as a training loop runs (tokens/s comes from it; a sync
    # per step would take JAX's dispatch overlap away). Second half: one synchronisation per
    # step, so the step-time percentiles are real and queueing cannot hide a slow step.
    window = spec.steps // 2 if spec.steps >= 4 else 0
    times, window_s = [], None
    start = time.perf_counter()
    for i in range(spec.warmup, spec.warmup + window):
        outputs.append(step(batches[i]))
        emit("step", phase="timed", done=i + 1 - spec.warmup, total=spec.steps)
    if window:
        backend.synchronize()
        window_s = time.perf_counter() - start
    for i in range(spec.warmup + window, total):
        t = time.perf_counter()
        out = step(batches[i])
        backend.synchronize()  # per step: an asynchronous backend must not look fast by queueing
        times.append(time.perf_counter() - t)
        outputs.append(out)
        emit("step", phase="timed", done=i + 1 - spec.warmup, total=spec.steps)
    memory = backend.memory_stats()

    # The losses are read after the clock stopped: StepOutput keeps them on the device, so
    # recording every step's loss costs the timed loop nothing.
    losses = [out.loss for out in outputs]
    # Of the devices one process drives; finish_row scales it to the devices the row uses.
    peak = backend.peak_flops(spec.precision)
    per_process = backend.devices_in_use
    # Devices the whole run uses: N processes x the devices each drives, but no more than the
    # machine has (N processes on one CPU share that one CPU; MFU and cost count it once).
    devices_used = per_process * world
    if world > 1 and backend.device_count:
        devices_used = min(devices_used, backend.device_count)
    layout = distributed.layout().as_dict()  # with the process group up: what torch.distributed says
    if world > 1:
        import torch.distributed as dist

        distributed.barrier()
        dist.destroy_process_group()  # a clean exit on every rank (torch warns otherwise)
    return {
        "device_kind": backend.device_kind,
        "devices": backend.device_count,
        "devices_used": devices_used,
        "devices_per_process": per_process,
        "world_size": world,
        "parallel": spec.parallel,
        "layout": layout,
        # On a CPU the intra-op threads per process decide what N processes can gain over one
        # (an N-process row gets OMP_NUM_THREADS = CPUs // N when it is unset: _child_env).
        "cpu_threads": torch.get_num_threads() if getattr(backend, "device_type", None) == "cpu" else None,
        "versions": versions,
        "setup_s": setup_s,
        "first_step_s": warm_times[0] if warm_times else None,
        "warmup_s": sum(warm_times),
        "step_times_s": times,
        "throughput_window": {"steps": window, "seconds": window_s} if window else None,
        "tokens_per_step": int(outputs[-1].tokens),  # of the global batch (every rank's slice)
        "samples_per_step": global_batch,
        "batch": batch_size,
        "seq": seq,
        "flops_per_token": flops_per_token,
        "peak_flops": float(peak) if peak else None,
        "memory": {"peak_bytes": memory.peak_bytes, "current_bytes": memory.current_bytes, "source": memory.source},
        "losses": losses,
    }


def _connect(path: str) -> socket.socket:
    """The event channel (rank 0 only)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not inheritable: children cannot hold it open
    sock.connect(path)
    return sock


def child_main(argv: list[str] | None = None) -> int:
    from anychip import distributed

    parser = argparse.ArgumentParser(prog="python -m anychip.bench.runner")
    parser.add_argument("--spec", required=True, help="RunSpec as JSON")
    parser.add_argument("--events", required=True, metavar="SOCKET", help="UNIX socket the parent listens on")
    args = parser.parse_args(argv)
    _watch_parent()
    # Under torchrun only rank 0 reports (its result is the row); the others train, and their
    # output goes to the log the parent keeps.
    events = _connect(args.events) if distributed.rank() == 0 else None

    def emit(event: str, **fields) -> None:
        if events is not None:  # one whole line per send, as it happens: progress is live
            events.sendall((json.dumps({"event": event, **fields}, default=str) + "\n").encode())

    try:
        row = measure(RunSpec.from_json(args.spec), emit)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as this row's failure
        import traceback

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)  # into the log, whose tail the row keeps
        emit("error", error=f"{type(exc).__name__}: {first}", traceback=tb)
        return 1
    else:
        emit("result", row=row)
        return 0
    finally:
        if events is not None:
            events.close()


# -- the parent ---------------------------------------------------------------------------------


# A launcher's variables: a bench row is a run of its own, so a bench started inside another
# launch (a shell where torchrun or jax.distributed set these) must not hand them to its children.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
              "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "JAX_COORDINATOR_ADDRESS",
              "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Every process of one row carries RUN_ENV=<token> in its environment, so a timeout can find
# and kill all of them: torchrun starts each worker in a session of its own, out of reach of
# the launcher's process group (torch/distributed/elastic/multiprocessing/subprocess_handler).
RUN_ENV = "ANYCHIP_BENCH_RUN"
# The bench's pid, which every process of a row watches (_watch_parent).
BENCH_PID_ENV = "ANYCHIP_BENCH_PARENT"


def _child_env(token: str, nproc: int = 1) -> dict[str, str]:
    """The parent's environment, with this anychip and the plug-in modules importable, no
    launcher variables, the row's token and the bench's pid. An N-process row without
    OMP_NUM_THREADS gets CPUs // N intra-op threads per process: torchrun would give each
    rank 1, while the 1-process row it is compared with uses every core."""
    import anychip

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("TORCHELASTIC_")}
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(anychip.__file__)))] + load_plugins()
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
    """The command of one row: the runner module, under torchrun when ``spec.nproc`` > 1
    (``--standalone``: a rendezvous on this host at a free port, so rows never collide)."""
    child = ["-m", "anychip.bench.runner", "--spec", spec.to_json(), "--events", events]
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


if __name__ == "__main__":
    sys.exit(child_main())
