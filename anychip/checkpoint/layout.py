"""Where checkpoints live on disk: the ``step-NNNNNNNNN`` names, listing the complete ones, and
resolving what a caller asked for (a root, an update, or one checkpoint's own directory).

A directory named ``step-*`` is complete exactly when it holds its manifest (the manifest is
written last and the directory renamed into place), so "latest" is found by scanning names,
with no mutable pointer file to go stale.
"""

from __future__ import annotations

import logging
import numbers
import re
from pathlib import Path

from anychip.checkpoint.format import MANIFEST
from anychip.errors import CheckpointNotFoundError

log = logging.getLogger("anychip")

TMP_PREFIX = ".tmp-"  # a save in progress (or killed): renamed to step-* once complete
TRASH_PREFIX = ".trash-"  # a rotated-out checkpoint, renamed away before it is deleted
LOCK_NAME = ".lock"  # held by the one process saving to the directory; never a checkpoint
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def dir_name(n: int) -> str:
    """The directory of the checkpoint of update ``n``."""
    return f"step-{n:09d}"


def step_of(name: str) -> int | None:
    """The update of a checkpoint directory name; None for anything else (non-canonical too)."""
    m = _CHECKPOINT_NAME.fullmatch(name)
    if m is None or dir_name(int(m.group(1))) != name:
        return None
    return int(m.group(1))


def checkpoints(path) -> list[Path]:
    """The complete checkpoints in ``path``, oldest update first (temporary dirs excluded)."""
    root = Path(path)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        n = step_of(entry.name)
        if n is not None and (entry / MANIFEST).is_file():
            found.append((n, entry))
    return [p for _, p in sorted(found)]


def update_number(at) -> int:
    """``at`` as an update number: an int >= 0 (a NumPy integer too), never a bool or a string."""
    if isinstance(at, bool) or not isinstance(at, numbers.Integral):
        raise TypeError(f"at must be an int update number (the N of step-N), got {type(at).__name__} {at!r}")
    if at < 0:
        raise ValueError(f"at must be an update number >= 0, got {at}")
    return int(at)


def resolve(path: Path, at: int | None) -> Path:
    """The one checkpoint directory that ``path`` (and ``at``) designate; raises
    :class:`CheckpointNotFoundError` naming what is there instead."""
    if at is not None:
        at = update_number(at)
    if at is None and ((path / MANIFEST).is_file() or step_of(path.name) is not None and path.is_dir()):
        return path  # one checkpoint's own directory (a missing manifest is reported as such)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint directory at {path}")
    complete = checkpoints(path)
    if at is not None:
        wanted = path / dir_name(at)
        if wanted in complete:
            return wanted
        have = ", ".join(str(step_of(p.name)) for p in complete) or "none"
        raise CheckpointNotFoundError(f"no complete checkpoint of update {at} in {path} (complete ones: {have})")
    if not complete:
        partial = [e.name for e in path.iterdir() if e.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
        note = f" (only unfinished saves: {', '.join(sorted(partial))})" if partial else ""
        raise CheckpointNotFoundError(f"no complete checkpoint in {path}{note}")
    latest = step_of(complete[-1].name)
    newer = [
        e.name for e in path.iterdir()
        if e.is_dir() and e not in complete and step_of(e.name) is not None and step_of(e.name) > latest
    ]
    if newer:
        log.warning("anychip: ignoring %s in %s: no %s, so not a complete checkpoint", ", ".join(sorted(newer)), path, MANIFEST)
    return complete[-1]
