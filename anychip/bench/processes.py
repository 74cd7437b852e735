"""Finding and stopping every process a bench row started, wherever it went.

A row's processes can leave every group the parent knows: torchrun starts each worker in a
session of its own, and a worker may start a helper with ``start_new_session=True`` and an
empty environment. Two mechanisms reach them:

- on Linux the bench becomes a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): a process
  whose parent dies is re-parented to the bench instead of to init, so nothing a row starts can
  leave the bench's children. After a row, :func:`sweep` kills and reaps every child that was
  not there before the row, pass after pass, until a pass finds none (a process killed while
  forking leaves children, which then become the bench's);
- every process of a row carries a token in its environment (:func:`with_env`), which also
  finds the ones whose parent is still alive, and serves where there is no subreaper.

Elsewhere (macOS: no ``prctl``, no ``/proc``) both come back empty and what remains is the
process group of the row's child and the children's own watch of the bench's pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from typing import Collection, Iterator

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def subreaper() -> Iterator[bool]:
    """Make this process a child subreaper for the block (yields whether it is one), then give
    it back its previous setting: ``anychip bench`` also runs inside other programs (tests)."""
    prctl = _prctl()
    if prctl is None:
        yield False
        return
    zero = ctypes.c_ulong(0)
    previous = ctypes.c_int(0)
    prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), zero, zero, zero)
    active = prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), zero, zero, zero) == 0
    try:
        yield active
    finally:
        if active and not previous.value:
            prctl(_PR_SET_CHILD_SUBREAPER, zero, zero, zero, zero)


def children() -> set[int]:
    """Pids whose parent is this process, zombies included (an empty set without ``/proc``)."""
    me = os.getpid()
    found = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if len(fields) > 1 and int(fields[1]) == me:
            found.add(int(entry))
    return found


def with_env(entry: str) -> list[int]:
    """Pids of the processes whose environment holds ``entry`` (``NAME=value``): Linux ``/proc``;
    an empty list elsewhere. A zombie has no environment left, so it is never found."""
    needle = entry.encode()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    found = []
    for pid in entries:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # gone, or another user's
            continue
    return found


def _reap(pid: int, deadline: float) -> None:
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not a child (any more)
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.002)


def sweep(keep: Collection[int], env: str | None = None, limit_s: float = 10.0) -> int:
    """SIGKILL every child of this process that is not in ``keep`` and every process whose
    environment holds ``env``, reap the children, and repeat until a pass finds none (or
    ``limit_s`` passed: a process stuck in the kernel cannot be reaped, and the bench must not
    hang on it). Returns how many processes were killed. Never call it while a ``Popen`` of this
    process that is not in ``keep`` is still to be waited for: its exit status would be taken here."""
    deadline = time.monotonic() + limit_s
    killed: set[int] = set()
    while time.monotonic() < deadline:
        mine = children() - set(keep)
        others = [p for p in with_env(env) if p not in mine] if env else []
        if not mine and not others:
            break
        for pid in [*mine, *others]:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in mine:
            _reap(pid, deadline)
        if others and not mine:
            time.sleep(0.005)  # not ours to wait for: give SIGKILL time to land
    return len(killed)
