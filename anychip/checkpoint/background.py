"""Asynchronous saves: ``ac.save(..., asynchronous=True)`` copies the state aside and returns a
:class:`SaveHandle` while a thread writes it.

As Lightning's ``AsyncCheckpointIO`` and Orbax's ``AsyncCheckpointer`` do, one save is in
flight at a time: the next save (either kind) first waits for it, and a failure of the
background write is raised from ``handle.wait()`` or, if nobody waited, from that next save.
At interpreter exit an unfinished save is waited for with a log line, never dropped. The
snapshot buffers are kept for the next save (the same shapes every time): copying into memory
already mapped is several times faster than into fresh pages, and the copy is the time
training waits.
"""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path

from anychip.errors import CheckpointError

log = logging.getLogger("anychip")

_lock = threading.Lock()
_inflight: SaveHandle | None = None
_unreported: SaveHandle | None = None  # failed, and nobody has been told yet
_buffers: dict = {}  # key -> tensor of the last snapshot, reused when shape and dtype match
_exit_hook = False


class SaveHandle:
    """A save being written in the background: :meth:`wait` for it, :meth:`done` to ask."""

    def __init__(self, path: Path, step: int):
        self.path, self.step = path, step
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._reported = False

    def done(self) -> bool:
        """Whether the write has ended (successfully or not); never blocks."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> Path:
        """Block until the checkpoint is complete and return its directory; re-raise the
        background write's error (once: a later save no longer raises it)."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the asynchronous save of update {self.step} to {self.path} is still writing after {timeout} s")
        _mark_reported(self)
        if self._error is not None:
            raise self._error
        return self.path

    def __repr__(self) -> str:
        state = "writing" if not self.done() else "failed" if self._error else "complete"
        return f"SaveHandle(step={self.step}, path={str(self.path)!r}, {state})"

    def _run(self, write, release) -> None:
        global _inflight, _unreported
        try:
            write()
        except BaseException as exc:  # noqa: BLE001 - kept for wait() or the next save
            self._error = exc if isinstance(exc, Exception) else CheckpointError(f"{type(exc).__name__}: {exc}")
            log.error("anychip: the asynchronous save of update %d to %s failed: %s", self.step, self.path, self._error)
        finally:
            release()
            with _lock:
                if self._error is not None and not self._reported:
                    _unreported = self
                _inflight = None
                self._finished.set()


def _mark_reported(handle: SaveHandle) -> None:
    global _unreported
    with _lock:
        handle._reported = True
        if _unreported is handle:
            _unreported = None


def settle_previous() -> None:
    """Before a save: wait for the one in flight, and raise a failure nobody has seen yet."""
    _wait_for_inflight(logging.INFO, "before saving again")
    with _lock:
        failed = _unreported
    if failed is not None:
        _mark_reported(failed)
        raise CheckpointError(
            f"the previous asynchronous save (update {failed.step} to {failed.path}) failed: {failed._error}; "
            "nothing of it was kept and the checkpoints before it are intact. Fix the cause and save again"
        ) from failed._error


def snapshot(tensors: dict) -> dict:
    """A private host copy of every tensor (a DTensor: of this rank's shard, still a DTensor),
    into the buffers of the last snapshot where they fit. From an accelerator it is the one
    device-to-host copy of the save, into pinned memory, waited for before training goes on."""
    import torch

    out, on_device = {}, False
    for key, t in tensors.items():
        buf = _buffers.get(key)
        same = buf is not None and buf.shape == t.shape and buf.dtype == t.dtype and type(buf) is type(t)
        if same and hasattr(t, "device_mesh"):
            same = buf.device_mesh == t.device_mesh and buf.placements == t.placements
        if not same:
            buf = _host_like(t)
        src, dst = (t.to_local(), buf.to_local()) if hasattr(t, "device_mesh") else (t, buf)
        on_device = on_device or src.device.type != "cpu"
        dst.copy_(src.detach(), non_blocking=src.device.type != "cpu")
        out[key] = buf
    if on_device:
        torch.accelerator.synchronize()
    _buffers.clear()
    _buffers.update(out)
    return out


def _host_like(t):
    import torch

    if hasattr(t, "device_mesh"):
        from torch.distributed.tensor import DTensor

        local = t.to_local()
        host = torch.empty_like(local, device="cpu", pin_memory=local.is_cuda)
        return DTensor.from_local(host, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return torch.empty_like(t, device="cpu", pin_memory=t.is_cuda)


def start(path: Path, step: int, write, release) -> SaveHandle:
    """Run ``write()`` in a thread; ``release()`` after it, whatever happened."""
    global _inflight, _exit_hook
    handle = SaveHandle(path, step)
    with _lock:
        _inflight = handle
        if not _exit_hook:
            # Before threading's own shutdown where Python offers it: the write may still start
            # threads then (at atexit, Python 3.12 refuses new threads).
            getattr(threading, "_register_atexit", atexit.register)(_finish_at_exit)
            _exit_hook = True
    # A daemon thread: at exit it is waited for here, with a log line, not silently by threading.
    threading.Thread(target=handle._run, args=(write, release), name=f"anychip-save-{step}", daemon=True).start()
    return handle


def _finish_at_exit() -> None:
    _wait_for_inflight(logging.WARNING, "to finish before exiting")


def _wait_for_inflight(level: int, why: str) -> None:
    with _lock:
        pending = _inflight
    if pending is not None and not pending.done():
        log.log(level, "anychip: waiting for the asynchronous save of update %d to %s %s", pending.step, pending.path, why)
        pending._finished.wait()
