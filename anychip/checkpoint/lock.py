"""One writer per checkpoint directory: the lock a save holds from its first check to its last
rotation.

Between processes it is ``flock`` on ``<root>/.lock``: the kernel releases it when the holder
exits, however it dies (no stale lock to clean up after a SIGKILL), and it is taken without
waiting for the holder's save, so a second writer learns at once that it would race. Leftover
cleanup and rotation remove what no live save owns only because no other save can be running.
The holder writes its pid into the file, so the refusal can say who holds the directory.
Threads of one process share one lock object per directory and queue behind each other instead
(``flock`` would also refuse a second descriptor opened by the same process, naming this
process as the holder).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

from anychip.checkpoint.durable import make_dirs, refusal
from anychip.checkpoint.layout import LOCK_NAME
from anychip.errors import CheckpointBusyError, CheckpointError

try:
    import fcntl
except ImportError:  # not POSIX: threads are still serialised, processes are not
    fcntl = None

HANDOVER_S = 0.1  # how long a refused writer looks for the holder's pid (see _wait_for_holder)
_registry = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}


class WriterLock:
    """An acquired directory lock; :meth:`release` (or leaving the ``with`` block) frees it."""

    def __init__(self, thread_lock: threading.Lock, fd: int | None):
        self._thread_lock, self._fd = thread_lock, fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # no pid while nobody holds it
            finally:
                os.close(self._fd)  # closing the only descriptor drops the flock
                self._fd = None
                self._thread_lock.release()

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(root: Path) -> WriterLock:
    """Create ``root`` if needed and lock it for one save, or raise :class:`CheckpointBusyError`
    naming the process that holds it (:class:`CheckpointError` if ``root`` cannot be a directory)."""
    try:
        make_dirs(root)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(
            f"cannot save to {root}: it (or a parent) is a file, not a directory; checkpoints go in a directory"
        ) from None
    except OSError as exc:
        raise refusal(exc, root, 0, None) from None
    key = os.path.realpath(root)
    with _registry:
        thread_lock = _thread_locks.setdefault(key, threading.Lock())
    thread_lock.acquire()
    try:
        fd = _lock_file(root / LOCK_NAME, root)
    except BaseException:
        thread_lock.release()
        raise
    return WriterLock(thread_lock, fd)


def _lock_file(path: Path, root: Path) -> int:
    # O_NOFOLLOW: a planted symlink must not make the save truncate some other file.
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            raise refusal(exc, root, 0, None) from None
        raise CheckpointError(f"cannot open the lock file {path} of {root}: {exc.strerror}") from None
    if fcntl is None:
        return fd
    try:
        holder = _wait_for_holder(fd)
        if holder is not None:
            raise CheckpointBusyError(
                f"{root} is being saved to by another process (pid {holder}, holding {path}); "
                "one writer per checkpoint directory: wait for that save to finish, or save elsewhere"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise CheckpointError(f"cannot lock {path}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        return False


def _wait_for_holder(fd: int) -> str | None:
    """None once ``fd`` holds the lock; else the pid of the live process that does.

    The holder writes its pid just after locking and empties the file just before unlocking,
    so for a moment the file can be empty or name a writer that has died: within that moment
    (0.1 s at most) the lock is tried again rather than a wrong or unknown pid reported."""
    deadline = time.monotonic() + HANDOVER_S
    while True:
        if _try_flock(fd):
            return None
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit() and _alive(int(text)):
            return text
        if time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.002)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
