"""Several processes, on the engines users already run: torchrun / torch.distributed, and JAX's
multi-controller runtime (``jax.distributed``). Nothing here launches processes; it reads
what the launcher set:

* torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``;
* JAX: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (or whatever
  cluster JAX detects by itself: SLURM, Open MPI, Cloud TPU).

``init_distributed()`` joins the right one for the selected backend; ``is_main_process()`` and
friends answer from whichever is running, without importing torch or jax to do so.

Failures between processes (a peer killed, a peer stuck) surface as :class:`DistributedError`:
every collective runs under the process group's timeout (``ANYCHIP_DIST_TIMEOUT`` seconds,
default 300), so a surviving rank stops with that error instead of waiting forever.

A torch process group anychip created is also left by anychip, at exit or by
``shutdown_distributed()``: see there why a finished run needs it.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import re
import sys

from anychip.errors import DistributedError

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "ANYCHIP_DIST_TIMEOUT"

# The torch process group init_process_group created (None: none, or it was left already);
# a group the script created itself is never stored here, so it is never torn down by anychip.
_created_group = None
_teardown_registered = False


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where this process sits: ``engine`` is "torchrun", "jax.distributed" or None (alone)."""

    engine: str | None
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    coordinator: str | None = None

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def describe(self) -> str:
        if self.engine is None:
            return "single process (no torchrun or jax.distributed launch detected)"
        where = f", coordinator {self.coordinator}" if self.coordinator else ""
        return (
            f"{self.engine}: world size {self.world_size} ({self.nodes} node(s) x {self.local_world_size}), "
            f"this is rank {self.rank} (local rank {self.local_rank}){where}"
        )

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "nodes": self.nodes}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; unset it or fix the launcher") from None


def _torch_group():
    """torch.distributed when a process group is up (only if torch was imported already)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _jax_multiprocess():
    """The jax module when jax.distributed joined several processes (only if jax was imported)."""
    jax = sys.modules.get("jax")
    if jax is None or not getattr(jax, "distributed", None) or not jax.distributed.is_initialized():
        return None
    return jax


def layout() -> Layout:
    """This process's place in the run, from the live runtime if one is up, else the launcher's
    environment variables. Cheap: imports neither torch nor jax."""
    dist = _torch_group()
    if dist is not None:
        world = dist.get_world_size()
        return Layout("torchrun", world, dist.get_rank(), _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world), _master())
    jax = _jax_multiprocess()
    if jax is not None:
        return Layout("jax.distributed", jax.process_count(), jax.process_index(), 0, 1, os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if "WORLD_SIZE" in os.environ:
        world = _env_int("WORLD_SIZE", 1)
        return Layout("torchrun", world, _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world), _master())
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return Layout(
            "jax.distributed", _env_int("JAX_NUM_PROCESSES", 1), _env_int("JAX_PROCESS_ID", 0), 0, 1, os.environ["JAX_COORDINATOR_ADDRESS"]
        )
    return Layout(None, 1, 0, 0, 1)


def _master() -> str | None:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else None


def world_size() -> int:
    return layout().world_size


def rank() -> int:
    return layout().rank


def local_rank() -> int:
    return layout().local_rank


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): where logs, checkpoints and results are written."""
    return layout().rank == 0


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds > 0")
    return seconds


def launch_hint(script: str | None = None) -> str:
    script = script or (os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c", "-m") else "train.py")
    return f"torchrun --nproc-per-node=N {script}"


def launched_world_size() -> int | None:
    """The world size torchrun announced (WORLD_SIZE), or None outside torchrun."""
    return _env_int("WORLD_SIZE", 1) if "WORLD_SIZE" in os.environ else None


def require_launch(parallel: str) -> None:
    """Refuse ``parallel=`` on a torch backend in a process torchrun did not start."""
    if _torch_group() is None and "WORLD_SIZE" not in os.environ:
        raise DistributedError(
            f"parallel={parallel!r} needs one process per device started by torchrun (WORLD_SIZE is not set); "
            f"launch with: {launch_hint()}"
        )


def init_distributed(backend=None, *, timeout: float | None = None) -> Layout:
    """Join the run the launcher started, for ``backend`` (a name or Backend; default the
    selected one): a torch process group (nccl / neuron / xla / gloo, as the backend says)
    under torchrun, ``jax.distributed.initialize()`` for the jax backends. A no-op (returning
    the single-process layout) when nothing launched this process as part of a group; safe to
    call twice. ``timeout`` (seconds) bounds every collective; it is stored in
    ``ANYCHIP_DIST_TIMEOUT``, which processes started from this one inherit."""
    from anychip.backends import backend as select
    from anychip.backends.contract import Backend

    be = backend if isinstance(backend, Backend) else select(backend)
    if timeout is not None:
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        os.environ[TIMEOUT_ENV] = str(float(timeout))
    be.init_distributed()
    return layout()


def init_process_group(backend: str) -> None:
    """Join the torch process group torchrun set up; a no-op outside torchrun or when joined.
    Accelerators bind this process to its local device first (nccl and neuron need it)."""
    import torch.distributed as dist

    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    seconds = timeout_s()
    if backend == "nccl":
        # Without asynchronous error handling a dead peer leaves NCCL collectives waiting
        # forever; with it the watchdog aborts them at the timeout.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except Exception as exc:  # noqa: BLE001 - rendezvous failures come as many types
        raise DistributedError(
            f"rank {rank()}/{world_size()}: could not join the {backend} process group at {_master() or '?'} "
            f"within {seconds:g} s: {first_line(exc)}"
        ) from exc
    global _created_group, _teardown_registered
    _created_group = dist.group.WORLD
    if not _teardown_registered:
        atexit.register(_teardown_at_exit)
        _teardown_registered = True


def shutdown_distributed() -> None:
    """Leave the torch process group anychip joined: a barrier under the distributed timeout,
    then ``destroy_process_group()``. Runs by itself at exit; call it to leave earlier.

    Without it a rank that finished can exit while gloo's threads still hold connections to a
    peer that is exiting too, and die of SIGABRT ("terminate called without an active
    exception") after training finished; the barrier makes every rank stop talking first.
    A rank that never arrives fails it within ``ANYCHIP_DIST_TIMEOUT`` seconds with a
    :class:`DistributedError` (one line), and the group is then left as it is.

    A no-op when no group is up, when it was left already, and when the script created the
    group itself (``dist.init_process_group`` before anychip's step): the script then owns the
    group's teardown, since anychip cannot know whether other code still uses it."""
    global _created_group
    dist = _torch_group()
    group, _created_group = _created_group, None
    if dist is None or group is None or dist.group.WORLD is not group:
        return
    if dist.get_world_size() > 1:
        seconds = timeout_s()
        try:
            _barrier_within(dist, seconds)
        except Exception as exc:  # noqa: BLE001 - whatever the barrier raised, a peer did not arrive
            raise peer_failure(exc, "leaving the process group") from exc
    global _side_group
    dist.destroy_process_group()  # every group goes with it, the checkpoints' side group too
    _side_group = None


def _barrier_within(dist, seconds: float) -> None:
    timeout = datetime.timedelta(seconds=seconds)
    if dist.get_backend() == "gloo":
        # monitored_barrier takes its own timeout and names the rank that did not arrive.
        dist.monitored_barrier(timeout=timeout)
    else:
        dist.barrier(async_op=True).wait(timeout)


def _teardown_at_exit() -> None:
    """``shutdown_distributed()`` when the interpreter exits. Skipped when the script died of an
    uncaught exception: it failed already, and its peers may never reach a barrier."""
    if getattr(sys, "last_value", None) is not None:
        return
    try:
        shutdown_distributed()
    except DistributedError as exc:
        print(f"anychip: DistributedError: {exc}", file=sys.stderr)
        # An exception in an exit handler leaves the exit status 0, and the group cannot be
        # destroyed with a peer missing: end the process here, with the reason above.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def peer_failure(exc: BaseException, what: str) -> DistributedError:
    """The error a surviving rank raises when a collective fails or times out."""
    # gloo prefixes its messages with a source location (and a "[Rank N]: " tag that repeats
    # the rank named below) and appends advice; the reason is between.
    reason = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    reason = re.sub(r"^\[Rank \d+\]:\s*", "", reason)
    reason = reason.split(". ")[0].rstrip(".") or type(exc).__name__
    lay = layout()
    return DistributedError(
        f"rank {lay.rank}/{lay.world_size}: {what}: a collective failed ({reason}); another rank probably died or "
        f"hung (timeout {timeout_s():g} s, set by {TIMEOUT_ENV}); see that rank's log"
    )


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came out of torch.distributed (a peer lost, a timeout), not user code."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text
        for s in (
            "Connection closed by peer",
            "Connection reset by peer",
            "Timed out waiting",
            "ProcessGroup",
            "[gloo]",
            "gloo/transport",
            "NCCL",
        )
    )


def barrier() -> None:
    """Wait for every process (no-op alone)."""
    dist = _torch_group()
    if dist is not None:
        dist.barrier()
        return
    jax = _jax_multiprocess()
    if jax is not None and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("anychip")


def torch_processes() -> int:
    """Processes of the torch process group (1 when none is up): >1 means a save or load is a
    collective of them all."""
    dist = _torch_group()
    return dist.get_world_size() if dist is not None else 1


def side_group():
    """A second gloo group of all torch processes, for the collectives of a checkpoint written
    in a background thread: on the default group they would interleave with training's."""
    global _side_group
    if _side_group is None:
        import torch.distributed as dist

        _side_group = dist.new_group(backend="gloo")  # a collective: every rank asks at the same save
    return _side_group


_side_group = None


def all_ranks(value, group=None) -> list:
    """Every torch process's ``value`` (small, JSON-like), in rank order; ``[value]`` alone."""
    dist = _torch_group()
    if dist is None or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=group)
    return out


def from_main(value, group=None):
    """Rank 0's ``value`` (small, JSON-like) on every torch process."""
    dist = _torch_group()
    if dist is None or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def main_outcome(error: str | None, group=None) -> str | None:
    """Rank 0's outcome (None: success, else its error message), on every process: a step only
    rank 0 performs (writing a checkpoint) succeeds or fails everywhere at once."""
    if torch_processes() > 1:
        return from_main(error, group)
    jax = _jax_multiprocess()
    if jax is not None and jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is not None)))
        return (error or "process 0 failed; see its log") if failed else None
    return error
