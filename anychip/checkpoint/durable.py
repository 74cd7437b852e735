"""Crash-safe changes to a checkpoint root: a new checkpoint appears whole or not at all, and
an old one disappears whole or not at all.

A save writes into ``root/.tmp-...``, fsyncs every file and the directory, renames it to
``step-NNNNNNNNN`` (atomic on POSIX) and fsyncs ``root``. Rotation deletes old checkpoints
only after the new one is durable, by renaming them to ``.trash-...`` first (again atomic), so
an interrupted deletion never leaves a half-deleted ``step-*``. Leftover ``.tmp-*`` /
``.trash-*`` entries are removed by the next save. One writer per root (rank 0 in a
distributed run, holding :mod:`~anychip.checkpoint.lock` for the whole save) is what makes
removing leftovers safe: a second writer's cleanup would delete the first one's ``.tmp-*``.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from pathlib import Path

from anychip.checkpoint.layout import TMP_PREFIX, TRASH_PREFIX, checkpoints
from anychip.errors import CheckpointError, CheckpointExistsError

log = logging.getLogger("anychip")


def start(root: Path, final: Path) -> Path:
    """The temporary directory a save of ``final`` writes into (leftovers of earlier saves removed)."""
    make_dirs(root)
    remove_leftovers(root)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def finish(tmp: Path, root: Path, final: Path, last: str, data: bytes) -> Path:
    """Write ``last`` (whose presence marks the checkpoint complete) into ``tmp``, once every
    other file there is durable, and rename ``tmp`` to ``final``; ``tmp`` is removed on failure."""
    try:
        fsync_dir(tmp)  # the other files' entries (written by every rank) before the manifest
        write_durable(tmp / last, data)
        fsync_dir(tmp)
        if final.exists():  # re-checked right before the rename, which would replace an empty dir
            raise CheckpointExistsError(f"{final} appeared while saving; checkpoints are never overwritten")
        os.rename(tmp, final)
    except BaseException:
        discard(tmp)
        raise
    fsync_dir(root)
    return final


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def refusal(exc: OSError, root: Path, needed: int, keep_last: int | None) -> CheckpointError:
    """The file system's refusal to take a save, as one line that says what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(no_space_message(root, needed, keep_last))
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CheckpointError(
            f"cannot write checkpoints to {root}: {exc.strerror or exc} (a read-only file system, or not writable by this "
            "user); save to a writable directory"
        )
    return CheckpointError(f"cannot write checkpoints to {root}: {exc.strerror or exc}")


def no_space_message(root: Path, needed: int, keep_last: int | None) -> str:
    """Why a save ran out of room, in numbers: what it needed and what is free on ``root``'s disk."""
    try:
        free = f"{shutil.disk_usage(root).free} bytes free"
    except OSError:
        free = "free space unknown"
    message = f"no space left on the device of {root}: this checkpoint needs {needed} bytes, {free}"
    if keep_last is not None:
        # The new checkpoint is complete before the oldest one is removed, never the other way.
        message += (f"; keep_last={keep_last} needs room for {keep_last + 1} checkpoints "
                    f"(about {(keep_last + 1) * needed} bytes) while a save runs")
    return message + ". Free some space, lower keep_last, or save elsewhere"


def write_durable(path: Path, data: bytes) -> None:
    """Create ``path`` (never replacing a file) holding ``data``, flushed to the disk."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created/renamed files) durable; a no-op where unsupported."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(root: Path) -> None:
    """``mkdir -p root``, with each new entry made durable in its parent."""
    missing = []
    p = root.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    root.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def remove_leftovers(root: Path) -> None:
    """Unfinished saves and interrupted deletions of earlier runs (single writer per directory)."""
    for entry in root.iterdir():
        if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and entry.is_dir() and not entry.is_symlink():
            log.info("anychip: removing leftover %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def rotate(root: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (never ``keep``)."""
    complete = [p for p in checkpoints(root) if p != keep]
    doomed = complete[: max(0, len(complete) - (keep_last - 1))]
    for old in doomed:
        trash = root / f"{TRASH_PREFIX}{old.name}-{secrets.token_hex(4)}"
        os.rename(old, trash)  # atomic: a step-* directory is complete or absent, never half-deleted
    if doomed:
        fsync_dir(root)
    for old in root.iterdir():
        if old.name.startswith(TRASH_PREFIX):
            shutil.rmtree(old, ignore_errors=True)
