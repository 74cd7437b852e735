"""One backend per process.

``anychip bench`` never runs a backend in its own process: it starts
``python -m anychip.bench.runner --spec JSON --events-fd N`` once per backend, one after the
other (running them side by side would make them compete for the host and distort every
timing). A crash, an out-of-memory kill or a hang therefore ends one row, not the run, and
``--timeout`` can kill a backend together with any process it started (each child leads its
own session, so a terminal Ctrl-C reaches only the parent, which stops the child itself and
still writes the rows that finished).

The child reports on a pipe of its own (``--events-fd``), one JSON object per line, so
that whatever a library prints to stdout/stderr cannot corrupt the protocol; stdout and stderr
go to a log whose tail explains a crash:

    {"event": "ready", "device_kind": ..., "devices": ..., "versions": {...}}
    {"event": "step", "phase": "warmup" | "timed", "done": k, "total": n}
    {"event": "result", "row": {...measurements...}}      or      {"event": "error", ...}

Test-only or third-party backends reach the child through ``ANYCHIP_PLUGINS``: a
comma-separated list of modules, imported in the parent and in every child before any backend
is looked up; importing one is expected to call :func:`anychip.backends.register`.

Same seed, same initial weights, same batches on every backend: the model is built on the
host from ``workload.build(seed)`` and every batch from ``workload.batch(step, ..., seed)``,
generated before the clock starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
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


def _watch_parent() -> None:
    """Exit when the parent goes away (killed with SIGKILL, say): a hung child must not outlive
    the run that started it. It leads its own session, so nothing else would stop it."""
    parent = os.getppid()

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, name="anychip-bench-parent-watch", daemon=True).start()


def measure(spec: RunSpec, emit: Callable[..., None]) -> dict:
    """Build, warm up and time one backend; returns the measurement row."""
    import platform

    import anychip as ac
    from anychip import workloads

    load_plugins()
    backend = ac.backend(spec.backend)
    import torch  # after the backend: some backends configure the environment torch reads

    versions = {"python": platform.python_version(), "anychip": ac.__version__, "torch": torch.__version__}
    versions.update(backend.availability.versions)
    emit("ready", device_kind=backend.device_kind, devices=backend.device_count, versions=versions)

    t0 = time.perf_counter()
    workload = workloads.get(spec.workload)
    batch_size = spec.batch or workload.default_batch
    seq = spec.seq or workload.default_seq
    total = spec.warmup + spec.steps
    batches = [workload.batch(i, batch_size, seq, spec.seed) for i in range(total)]
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
    peak = backend.peak_flops(spec.precision)
    return {
        "device_kind": backend.device_kind,
        "devices": backend.device_count,
        "devices_used": backend.devices_in_use,
        "versions": versions,
        "setup_s": setup_s,
        "first_step_s": warm_times[0] if warm_times else None,
        "warmup_s": sum(warm_times),
        "step_times_s": times,
        "throughput_window": {"steps": window, "seconds": window_s} if window else None,
        "tokens_per_step": int(outputs[-1].tokens),
        "samples_per_step": batch_size,
        "batch": batch_size,
        "seq": seq,
        "flops_per_token": flops_per_token,
        "peak_flops": float(peak) if peak else None,
        "memory": {"peak_bytes": memory.peak_bytes, "current_bytes": memory.current_bytes, "source": memory.source},
        "losses": losses,
    }


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anychip.bench.runner")
    parser.add_argument("--spec", required=True, help="RunSpec as JSON")
    parser.add_argument("--events-fd", type=int, required=True)
    args = parser.parse_args(argv)
    os.set_inheritable(args.events_fd, False)  # processes this one starts must not hold the pipe open
    events = os.fdopen(args.events_fd, "w", buffering=1)
    _watch_parent()

    def emit(event: str, **fields) -> None:
        events.write(json.dumps({"event": event, **fields}, default=str) + "\n")

    try:
        row = measure(RunSpec.from_json(args.spec), emit)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as this row's failure
        import traceback

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)  # into the log, whose tail the row keeps
        emit("error", error=f"{type(exc).__name__}: {first}", traceback=tb)
        events.flush()
        return 1
    emit("result", row=row)
    events.flush()
    return 0


# -- the parent ---------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """The parent's environment, with this anychip and the plug-in modules importable."""
    import anychip

    env = dict(os.environ)
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(anychip.__file__)))] + load_plugins()
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + existing))
    return env


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(log) -> list[str]:
    log.seek(0)
    lines = log.read().decode("utf-8", "replace").splitlines()
    return [line for line in lines if line.strip()][-LOG_TAIL_LINES:]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {code}"


def run_backend(spec: RunSpec, timeout: float, on_event: Callable[[dict], None] = lambda e: None) -> Outcome:
    """Run one backend in a fresh process; never raises for the child's sake (KeyboardInterrupt
    excepted: the child is killed first, then it propagates)."""
    read_fd, write_fd = os.pipe()
    log = tempfile.TemporaryFile()
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "anychip.bench.runner", "--spec", spec.to_json(), "--events-fd", str(write_fd)]
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            start_new_session=True, env=_child_env(),
        )
    except OSError as exc:
        os.close(read_fd)
        log.close()
        return Outcome("failed", error=f"cannot start {sys.executable}: {exc}")
    finally:
        os.close(write_fd)
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
                    _kill(proc)
                    outcome.status = "timeout"
                    outcome.error = f"no result within --timeout {timeout:g} s, killed (last progress: {last_step})"
                    outcome.log_tail = _tail(log)
                    break
                readable, _, _ = select.select([read_fd], [], [], min(remaining, 0.25))
                if readable:
                    chunk = os.read(read_fd, 1 << 16)
                    eof = not chunk
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        handle(line)
                elif proc.poll() is not None:
                    eof = True  # exited; a grandchild may still hold the pipe, nothing more will come
            else:
                try:
                    outcome.exit_code = proc.wait(timeout=max(1.0, started + timeout - time.perf_counter()))
                except subprocess.TimeoutExpired:
                    _kill(proc)
                    outcome.exit_code = proc.returncode
                # The process group may still hold helpers (compile workers); they go with it.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if outcome.measured is not None:
                    outcome.status = "ok"
                elif outcome.error is not None:
                    outcome.status = "failed"
                else:
                    outcome.status = "crashed"
                    outcome.error = f"{_describe_exit(outcome.exit_code)} (last progress: {last_step})"
                if outcome.status != "ok":
                    outcome.log_tail = _tail(log)
    except KeyboardInterrupt:
        _kill(proc)
        raise
    finally:
        os.close(read_fd)
        outcome.wall_s = time.perf_counter() - started
    return outcome


if __name__ == "__main__":
    sys.exit(child_main())
