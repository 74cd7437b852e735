"""The child side of ``anychip bench``: one row measured in a process of its own.

``python -m anychip.bench.measure --spec JSON --events SOCKET`` builds the workload's model and
batches, a :class:`~anychip.step.TrainStep` on the row's backend, warms it up (compilation
happens there) and times it: ``repeat`` windows of ``steps`` updates, back to back, each timed on
the host with one device synchronisation before it and one at its end, as a training loop runs
(a sync per step would take away an asynchronous backend's dispatch overlap; no sync would let
it look fast by queueing). Each window gives one value, seconds per step; step time and tokens/s
are both derived from these values (median and p10-p90, :mod:`anychip.bench.metrics`), so they
agree, and the spread between windows is what ``anychip bench compare`` judges a change
against. The parent (:mod:`anychip.bench.supervise`) starts it, once per
row, under torchrun for an ``nproc`` > 1 row (every rank trains, rank 0 alone reports).

The child reports on a channel of its own, so that whatever a library prints to stdout/stderr
cannot corrupt the protocol: a UNIX socket the parent listens on, named by ``--events`` (a
path, not an inherited file descriptor: torchrun passes no descriptors to the workers it
starts). One JSON object per line:

    {"event": "ready", "device_kind": ..., "devices": ..., "versions": {...}, "layout": {...}}
    {"event": "step", "phase": "warmup" | "timed", "done": k, "total": n}   (timed: once per window)
    {"event": "result", "row": {...measurements...}}      or      {"event": "error", ...}

Test-only or third-party backends reach the child through ``ANYCHIP_PLUGINS`` (loaded before
any backend is looked up). Same seed, same initial weights, same batches on every backend: the
model is built on the host from ``workload.build(seed)`` and every batch from
``workload.batch(step, ..., seed)``, generated before the clock starts. Under torchrun every
rank builds the same global batch (``nproc`` x ``batch`` samples: weak scaling) and
``TrainStep(parallel=...)`` trains each rank on its slice of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from typing import Callable

from anychip.backends import load_plugins

# The bench's pid, which every process of a row watches (_watch_parent).
BENCH_PID_ENV = "ANYCHIP_BENCH_PARENT"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one child measures. Everything a row must share with the others is in here."""

    backend: str
    workload: str
    steps: int  # per timed window
    warmup: int
    batch: int | None = None
    seq: int | None = None
    precision: str = "fp32"
    kernels: str = "auto"
    seed: int = 0
    lr: float = 1e-3
    nproc: int = 1  # processes; > 1: launched by torchrun, batch per process, N x batch per step
    parallel: str | None = None  # TrainStep(parallel=...) of an nproc > 1 row: "ddp" or "fsdp"
    repeat: int = 1  # timed windows of `steps` updates each
    log_dir: str | None = None  # per-step metrics of the row (anychip.metrics_log), written after the windows
    profile: int = 0  # > 0: trace this many extra steps after the windows into the row's log directory

    def __post_init__(self) -> None:
        if not (isinstance(self.repeat, int) and self.repeat >= 1):
            raise ValueError(f"repeat must be an int >= 1, got {self.repeat!r}")
        if not (isinstance(self.nproc, int) and self.nproc >= 1):
            raise ValueError(f"nproc must be an int >= 1, got {self.nproc!r}")
        if (self.parallel is None) != (self.nproc == 1):
            raise ValueError(f"nproc={self.nproc} needs parallel='ddp' or 'fsdp' exactly when nproc > 1, got {self.parallel!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))


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

    from anychip import distributed, workloads
    from anychip.backends import backend as select
    from anychip.optim import AdamW, WarmupCosine
    from anychip.step import TrainStep
    from anychip.version import __version__

    load_plugins()
    world = distributed.world_size()
    if world != spec.nproc:
        raise RuntimeError(f"this row runs on {spec.nproc} process(es), but the launch has world size {world}")
    backend = select(spec.backend)
    import torch  # after the backend: some backends configure the environment torch reads

    versions = {"python": platform.python_version(), "anychip": __version__, "torch": torch.__version__}
    versions.update(backend.availability.versions)
    emit("ready", device_kind=backend.device_kind, devices=backend.device_count, versions=versions,
         layout=distributed.layout().as_dict())

    t0 = time.perf_counter()
    workload = workloads.get(spec.workload)
    batch_size = spec.batch or workload.default_batch  # per process
    seq = spec.seq or workload.default_seq
    timed = spec.steps * spec.repeat
    total = spec.warmup + timed
    # Weak scaling: every rank builds the same global batch of world x batch samples and
    # TrainStep trains each on its slice (split_batches), so each process keeps `batch`.
    global_batch = batch_size * world
    # Every window trains on the same `steps` batches: windows then differ only by the machine's
    # noise (not by data-dependent work), and the host holds warmup + steps batches, not repeat x.
    batches = [workload.batch(i, global_batch, seq, spec.seed) for i in range(spec.warmup + spec.steps)]
    model = workload.build(seed=spec.seed)
    flops_per_token = float(workload.flops_per_token(model, seq))
    schedule = WarmupCosine(warmup=max(1, total // 10), total=total, min_ratio=0.1)
    step = TrainStep(
        model,
        workload.loss_fn,
        AdamW(lr=spec.lr, weight_decay=0.1, schedule=schedule),
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
        step.synchronize()
        warm_times.append(time.perf_counter() - t)
        emit("step", phase="warmup", done=i + 1, total=spec.warmup)

    backend.reset_peak_memory()
    window_step_s = []
    for w in range(spec.repeat):
        if world > 1:
            distributed.barrier()  # the ranks reach a window at different times; start the clock together
        step.synchronize()
        start = time.perf_counter()
        for i in range(spec.warmup, spec.warmup + spec.steps):
            outputs.append(step(batches[i]))
        step.synchronize()
        window_step_s.append((time.perf_counter() - start) / spec.steps)
        emit("step", phase="timed", done=(w + 1) * spec.steps, total=timed)  # after the clock: no socket write inside a window
    memory = backend.memory_stats()

    # The losses are read after the last window: StepOutput keeps them on the device, so
    # recording every step's loss costs the timed windows nothing.
    losses = [out.loss for out in outputs]
    if spec.log_dir:
        _write_log(spec, backend, step, outputs, warm_times, window_step_s, batches)
    # Of the devices one process drives; finish_row scales it to the devices the row uses.
    peak = backend.peak_flops(spec.precision)
    per_process = backend.devices_in_use
    # Devices the whole run uses: N processes x the devices each drives, but no more than the
    # machine has (N processes on one CPU share that one CPU; MFU and cost count it once).
    devices_used = per_process * world
    if world > 1 and backend.device_count:
        devices_used = min(devices_used, backend.device_count)
    reg = backend.registration
    torch_on_host = reg is not None and reg.engine == "torch" and reg.host_cpu
    layout = distributed.layout().as_dict()  # with the process group up: what torch.distributed says
    if world > 1:
        distributed.shutdown_distributed()  # every rank leaves the group before the row is reported
    return {
        "device_kind": backend.device_kind,
        "devices": backend.device_count,
        "devices_used": devices_used,
        "devices_per_process": per_process,
        "world_size": world,
        "parallel": spec.parallel,
        "layout": layout,
        # On a CPU the intra-op threads per process decide what N processes can gain over one
        # (an N-process row gets OMP_NUM_THREADS = CPUs // N when it is unset: supervise._child_env).
        "cpu_threads": torch.get_num_threads() if torch_on_host else None,
        "versions": versions,
        "setup_s": setup_s,
        "first_step_s": warm_times[0] if warm_times else None,
        "warmup_s": sum(warm_times),
        "window_step_s": window_step_s,  # seconds per step of each timed window
        "window_steps": spec.steps,
        "tokens_per_step": int(outputs[-1].tokens),  # of the global batch (every rank's slice)
        "samples_per_step": global_batch,
        "batch": batch_size,
        "seq": seq,
        "flops_per_token": flops_per_token,
        "peak_flops": float(peak) if peak else None,
        "memory": {"peak_bytes": memory.peak_bytes, "current_bytes": memory.current_bytes, "source": memory.source},
        "losses": losses,
    }


def row_log_name(backend: str, nproc: int) -> str:
    """The sub-directory of ``--log-dir`` that holds one row's runs: ``jax_cpu``, ``cpu-nproc2``."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in backend)
    return name if nproc == 1 else f"{name}-nproc{nproc}"


def _write_log(spec: RunSpec, backend, step, outputs, warm_times, window_step_s, batches) -> None:
    """Every step of the row (warm-up and windows) into ``log_dir/<row>/version_N`` through
    MetricsLogger, read once the windows are over, so logging never runs inside the clock; a
    step's time is its own for a warm-up step and its window's seconds per step for a timed one.
    With ``profile``, that many more steps run afterwards under the profiler (every rank trains
    them, rank 0 traces them)."""
    from anychip.metrics_log import MetricsLogger, StepProfiler, step_record, tensorboard_available

    times = list(warm_times) + [t for t in window_step_s for _ in range(spec.steps)]
    logger = MetricsLogger(os.path.join(spec.log_dir, row_log_name(spec.backend, spec.nproc)), tensorboard=tensorboard_available())
    try:
        now = time.time()
        for out, seconds in zip(outputs, times):
            logger.log(step_record(out, seconds, now))
        if spec.profile:
            jax_like = getattr(backend.registration, "engine", None) == "jax"  # jax.profiler sees the jitted step
            profiler = StepProfiler(logger.run_dir, spec.profile, warmup=1, jax=jax_like,
                                    synchronize=step.synchronize) if logger.run_dir else None
            try:
                for i in range(1 + spec.profile):
                    step(batches[spec.warmup + i % spec.steps])
                    if profiler is not None:
                        profiler.step()
            finally:
                if profiler is not None:
                    profiler.close()
    finally:
        logger.close()


def _connect(path: str) -> socket.socket:
    """The event channel (rank 0 only)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not inheritable: children cannot hold it open
    sock.connect(path)
    return sock


def child_main(argv: list[str] | None = None) -> int:
    from anychip import distributed

    parser = argparse.ArgumentParser(prog="python -m anychip.bench.measure")
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


if __name__ == "__main__":
    sys.exit(child_main())
