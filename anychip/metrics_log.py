"""Per-step run logs: :class:`MetricsLogger` writes each training step's metrics as JSON Lines
(``metrics.jsonl``) and as TensorBoard event files; :class:`StepProfiler` traces a few steady
steps. What Lightning Fabric's and Accelerate's loggers give a training loop.

Every logger opens its own run directory ``log_dir/version_N`` (N one above the highest there),
as Lightning's TensorBoardLogger and CSVLogger do: a second run never appends to, nor
overwrites, the first one's files, and ``tensorboard --logdir log_dir`` shows the runs side by
side. Only the main process (rank 0) writes, as Lightning's ``rank_zero_only`` loggers do: under
data parallelism every rank holds the same reduced loss.

``TrainStep(logger=...)`` hands a step's values over one step late (:class:`LateRecord`), once
the next step is queued: reading a loss waits only for device work that has long been done, so
logging adds no synchronisation to the step.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import re
import time
from typing import Callable

from anychip import distributed, validate
from anychip.errors import InvalidArgumentError

JSONL = "metrics.jsonl"
INSTALL = "pip install 'anychip[logs]'"
_VERSION = re.compile(r"version_(\d+)")
_OWN = "MetricsLogger"
_WRITABLE = "pass a directory you can write to"


def tensorboard_available() -> bool:
    """Whether the tensorboard package is installed (looked up, not imported)."""
    return importlib.util.find_spec("tensorboard") is not None


def _summary_writer():
    if not tensorboard_available():
        raise InvalidArgumentError(f"{_OWN}(tensorboard=True) needs the tensorboard package: {INSTALL} (or pass tensorboard=False)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # installed but broken (a protobuf it cannot load): the same fix
        raise InvalidArgumentError(f"{_OWN}(tensorboard=True): tensorboard does not import ({exc}); reinstall it: {INSTALL}") from exc
    return SummaryWriter


def check_log_dir(path: str, flag: str = "log_dir", owner: str | None = _OWN) -> None:
    """``path`` is, or becomes, a directory this process can write to; else a one-line error
    naming ``flag`` (the argument or command-line flag that gave it) and its ``owner``."""
    who = f"{owner}: " if owner else ""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgumentError(f"{who}{flag} {path!r} is an existing file, not a directory; pass a directory (created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise InvalidArgumentError(f"{who}cannot create {flag} {path!r} ({exc.strerror or exc}); {_WRITABLE}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{who}{flag} {path!r} is not writable; {_WRITABLE}")


def _new_version(root: str) -> tuple[int, str]:
    while True:
        taken = [int(m.group(1)) for name in os.listdir(root) if (m := _VERSION.fullmatch(name))]
        version = max(taken, default=-1) + 1
        path = os.path.join(root, f"version_{version}")
        try:
            os.mkdir(path)  # exclusive: two runs starting together never share a directory
        except FileExistsError:
            continue
        except OSError as exc:
            raise InvalidArgumentError(f"{_OWN}: cannot create {path!r} ({exc.strerror or exc}); {_WRITABLE}") from exc
        return version, path


def _value(name: str, value):
    """A record's value as JSON and TensorBoard take it; a tensor is refused (reading it here
    would synchronise where the caller did not choose to)."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()  # a NumPy scalar, np.bool_ included
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    raise validate.fail(f"record[{name!r}]", value, "a number, a bool, a string, None or a list of numbers",
                        "pass float(t) for a tensor", owner=f"{_OWN}.log")


def _strict(value):
    """JSON has no NaN or infinity: such a value is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


class MetricsLogger:
    """Writes one record per training step to ``log_dir/version_N/``: ``metrics.jsonl`` (one
    JSON object a line; a non-finite value is null) and TensorBoard event files (through
    ``torch.utils.tensorboard.SummaryWriter``, one scalar per number, tag = key).

    ``TrainStep(..., logger=MetricsLogger("runs/"))`` logs every step; :meth:`log_values` logs
    any values by hand. Files are flushed every ``flush_every`` records (Lightning's default of
    100) and on :meth:`flush` / :meth:`close`; use it as a context manager, or close it: the last
    step's values are written then.
    """

    def __init__(self, log_dir, *, tensorboard: bool = True, jsonl: bool = True, flush_every: int = 100):
        if isinstance(log_dir, os.PathLike):
            log_dir = os.fspath(log_dir)
        if not isinstance(log_dir, str) or not log_dir.strip():
            raise validate.fail("log_dir", log_dir, "a directory path", "e.g. MetricsLogger('runs/')", owner=_OWN)
        tensorboard = validate.flag("tensorboard", tensorboard, owner=_OWN)
        jsonl = validate.flag("jsonl", jsonl, owner=_OWN)
        self.flush_every = validate.integer("flush_every", flush_every, min=1, owner=_OWN, fix="e.g. flush_every=100 (records)")
        if not (tensorboard or jsonl):
            raise InvalidArgumentError(f"{_OWN}: tensorboard=False and jsonl=False would write nothing; keep one of them True")
        writer_type = _summary_writer() if tensorboard else None
        self.root = os.path.abspath(os.path.expanduser(log_dir))
        check_log_dir(self.root)
        self.closed, self._hooks, self._unflushed = False, [], 0
        self._file = self._writer = None
        self.version = self.run_dir = None  # None on the processes that do not write
        if not distributed.is_main_process():
            return
        self.version, self.run_dir = _new_version(self.root)
        if jsonl:
            self._file = open(os.path.join(self.run_dir, JSONL), "x", encoding="utf-8")
        if writer_type is not None:
            self._writer = writer_type(log_dir=self.run_dir)

    def __repr__(self) -> str:
        return f"MetricsLogger({self.run_dir or self.root!r}{', closed' if self.closed else ''})"

    def log(self, record: dict) -> None:
        """Write one record: ``record["step"]`` (an int >= 0) and values that are numbers, bools,
        strings, None or lists of numbers (a list ``xs`` becomes TensorBoard tags ``xs/0``, ...);
        a number under ``"time"`` is the record's wall-clock time, not a scalar."""
        if self.closed:
            raise InvalidArgumentError(f"{_OWN}: log() after close(); open a new MetricsLogger for another run")
        if not isinstance(record, dict) or not all(isinstance(k, str) for k in record):
            raise validate.fail("record", record, "a dict with str keys", "e.g. log({'step': 3, 'loss': 0.5})", owner=f"{_OWN}.log")
        step = validate.integer("record['step']", record.get("step"), min=0, owner=f"{_OWN}.log", fix="e.g. log({'step': 3, 'loss': 0.5})")
        values = {k: _value(k, v) for k, v in record.items() if k != "step"}
        if self.run_dir is None:
            return
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **{k: _strict(v) for k, v in values.items()}}, allow_nan=False) + "\n")
        if self._writer is not None:
            wall = values.get("time") if isinstance(values.get("time"), float) else None
            for key, value in values.items():
                if key == "time" or value is None or isinstance(value, str):
                    continue
                for tag, number in ([(f"{key}/{i}", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]):
                    self._writer.add_scalar(tag, float(number), step, walltime=wall)
        self._unflushed += 1
        if self._unflushed >= self.flush_every:
            self._flush_files()

    def log_values(self, step: int, **values) -> None:
        """``log({"step": step, **values})``: e.g. ``log_values(3, loss=0.5, tokens_per_s=1.2e5)``."""
        self.log({"step": step, **values})

    def on_flush(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` first on every :meth:`flush` and :meth:`close`: how a ``TrainStep``
        hands over the record it still holds (its last step's)."""
        if not self.closed:
            self._hooks.append(hook)

    def flush(self) -> None:
        """Write the records steps still hold (reading the last step's values waits for its
        device work) and push every file to disk."""
        if self.closed:
            return
        for hook in list(self._hooks):
            hook()
        self._flush_files()

    def _flush_files(self) -> None:
        self._unflushed = 0
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the files; a second close does nothing."""
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed, self._hooks = True, []
            if self._file is not None:
                self._file.close()
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def step_record(out, step_time_s: float, started: float) -> dict:
    """A :class:`anychip.engine.StepOutput` as a record (reads its loss and gradient norm)."""
    record = {"step": out.step, "loss": out.loss, "grad_norm": out.grad_norm, "lr": out.lr}
    if len(out.lrs) > 1:
        record["lrs"] = list(out.lrs)
    record.update(step_time_s=step_time_s, tokens=out.tokens, tokens_per_s=out.tokens / step_time_s if step_time_s > 0 else None,
                  skipped=out.skipped, time=started)
    return record


class LateRecord:
    """What ``TrainStep(logger=...)`` keeps: step N's StepOutput is handed to ``logger.log`` during
    call N+1, after step N+1 is queued, so its device work is done by then; the last one on
    :meth:`settle` (``TrainStep.synchronize()``, or the logger's ``flush()`` / ``close()``).

    ``step_time_s`` is the host's view: from the start of call N to the start of call N+1 (the
    caller's own work between calls included), for the last step to the moment it is settled.
    While the host runs ahead of the device this is the device's pace once its queue is full.
    """

    def __init__(self, logger):
        self.logger, self._held = logger, None
        hook = getattr(logger, "on_flush", None)
        if callable(hook):
            hook(self.settle)

    @staticmethod
    def check_open(logger) -> None:
        """A closed logger is refused before a step's work starts."""
        if getattr(logger, "closed", False) is True:
            raise InvalidArgumentError(f"TrainStep: logger {logger!r} is closed; pass a new one to a new TrainStep")

    def push(self, out, started: float, wall: float) -> None:
        held, self._held = self._held, (out, started, wall)
        if held is not None:
            self.logger.log(step_record(held[0], started - held[1], held[2]))

    def settle(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self.logger.log(step_record(held[0], time.perf_counter() - held[1], held[2]))


class StepProfiler:
    """Traces ``steps`` training steps after ``warmup`` into ``directory``: ``torch.profiler``'s
    TensorBoard trace handler on the torch backends (``*.pt.trace.json``, a Chrome trace that
    Perfetto and TensorBoard's PyTorch profiler plug-in open), ``jax.profiler`` on ``jax:*``
    (``plugins/profile/<run>/``, TensorBoard's profile plug-in). Call :meth:`step` after each
    training step and :meth:`close` at the end; ``synchronize`` waits for the device, so the
    traced steps' device work lands inside the trace."""

    def __init__(self, directory: str, steps: int, *, warmup: int = 2, jax: bool = False, synchronize: Callable[[], None] | None = None):
        self.steps = validate.integer("steps", steps, min=1, owner="StepProfiler")
        self.warmup = validate.integer("warmup", warmup, min=1, owner="StepProfiler")  # the first steps compile
        self.directory, self.done, self._sync = directory, 0, synchronize or (lambda: None)
        self._torch = self._jax = None
        if jax:
            import jax as jax_module

            self._jax = jax_module.profiler
            self._tracing = False
            return
        import torch

        # One step of the profiler's own warm-up before recording, as torch's docs advise.
        when = torch.profiler.schedule(wait=self.warmup - 1, warmup=1, active=self.steps, repeat=1)
        self._torch = torch.profiler.profile(activities=list(torch.profiler.supported_activities()), schedule=when,
                                             on_trace_ready=torch.profiler.tensorboard_trace_handler(directory))
        self._torch.start()

    def step(self) -> None:
        self.done += 1
        if self.done == self.warmup + self.steps:
            self._sync()
        if self._torch is not None:
            self._torch.step()
        elif self.done == self.warmup:
            self._jax.start_trace(self.directory)
            self._tracing = True
        elif self.done == self.warmup + self.steps:
            self._stop_jax()

    def _stop_jax(self) -> None:
        if self._tracing:
            self._tracing = False
            self._jax.stop_trace()

    def close(self) -> None:
        """Stop tracing (a window cut short is still written); a second close does nothing."""
        if self._torch is not None:
            profiler, self._torch = self._torch, None
            profiler.stop()
        elif self._jax is not None:
            self._stop_jax()
