"""Backend-neutral checkpoints: ``ac.save(step, "ckpt/")`` on one chip, ``ac.load("ckpt/", step)``
on any other.

On disk, ``path`` is a directory of checkpoints, one sub-directory per save::

    ckpt/step-000000120/model.safetensors      model.state_dict() by name (aliases stored once)
                        optimizer.safetensors  optimizer slots as "<slot>/<parameter name>"
                        manifest.json          everything else, as plain JSON

The tensors are those of ``TrainStep.state_dict()``, which every engine already produces in
the neutral layout (parameters by name, optimizer slots by slot name then parameter name);
precision ``bf16`` therefore stores its float32 master weights and ``bf16-pure`` its bfloat16
ones. Loading verifies first and applies second: the step is only touched once the format,
every checksum, and every tensor name, shape and dtype have passed.

This module is the public API; the work is in :mod:`~anychip.checkpoint.format` (the bytes
on disk), :mod:`~anychip.checkpoint.layout` (names and finding checkpoints),
:mod:`~anychip.checkpoint.durable` (crash-safe writes and rotation),
:mod:`~anychip.checkpoint.integrity` (verifying what was read),
:mod:`~anychip.checkpoint.fit` (does it fit the step) and :mod:`~anychip.checkpoint.rng`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
from pathlib import Path
from typing import Any

from anychip import distributed
from anychip.checkpoint import durable, lock, rng
from anychip.checkpoint.fit import check_fits
from anychip.checkpoint.format import MANIFEST, build_manifest, find_aliases, manifest_bytes, safetensors, tensor_files
from anychip.checkpoint.integrity import read_verified
from anychip.checkpoint.layout import checkpoints, dir_name, resolve
from anychip.errors import (
    CheckpointBusyError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
)

log = logging.getLogger("anychip")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load` restored: where from, which update, and the manifest's facts."""

    path: Path
    step: int
    data_position: int  # the index of the next batch, for workload.batch(step, ...)
    backend: str  # the backend that wrote it
    precision: str
    extra: Any
    manifest: dict

    def __repr__(self) -> str:
        # What a user looks for when printing it; the whole manifest stays in .manifest.
        files = self.manifest.get("files") if isinstance(self.manifest, dict) else None
        sizes = [f.get("bytes") for f in files.values() if isinstance(f, dict)] if isinstance(files, dict) else []
        total = sum(n for n in sizes if isinstance(n, int) and not isinstance(n, bool))
        size = f", size={_human_bytes(total)!r}" if sizes else ""
        return (
            f"CheckpointInfo(step={self.step}, path={str(self.path)!r}, backend={self.backend!r}, "
            f"precision={self.precision!r}{size})"
        )


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def save(step, path, *, keep_last: int | None = None, extra: Any = None) -> Path:
    """Write ``step``'s training state to ``path/step-NNNNNNNNN/`` atomically; return that directory.

    ``keep_last=K`` then removes all but the K newest complete checkpoints. ``extra`` is any
    JSON-serialisable value stored in the manifest and returned by :func:`load`.
    Raises :class:`CheckpointExistsError` rather than replace a checkpoint of the same update,
    and :class:`CheckpointBusyError` while another process saves to ``path`` (one writer per
    directory; threads of one process take turns).
    Under torchrun / jax.distributed every process calls it; rank 0 writes (sharded FSDP state
    is gathered whole first) and every process returns or raises with rank 0's outcome.
    """
    _require_train_step(step, "save")
    if keep_last is not None and not (isinstance(keep_last, int) and not isinstance(keep_last, bool) and keep_last >= 1):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra must be JSON-serialisable (dicts, lists, str, numbers): {exc}") from None
    safetensors()  # a missing dependency fails before any process has gathered anything
    root = Path(path)
    final = root / dir_name(step.step_count)
    main = distributed.is_main_process()
    # Several processes: all of them call save() (an FSDP state is gathered collectively), rank 0
    # alone locks the directory and writes, and every rank learns rank 0's outcome, so none goes
    # on as if saved.
    writer = _claim(root, final, main)
    try:
        state = step.state_dict()
        if not main:
            error = distributed.main_outcome(None)
            if error:
                raise CheckpointError(f"rank 0 could not write {final}: {error}")
            return final
        try:
            written = _write(step, state, root, final, extra, keep_last)
        except BaseException as exc:
            distributed.main_outcome(f"{type(exc).__name__}: {exc}")
            raise
        distributed.main_outcome(None)
        if keep_last is not None:
            durable.rotate(root, keep_last, keep=written)
        return written
    finally:
        if writer is not None:
            writer.release()


def _claim(root: Path, final: Path, main: bool):
    """Rank 0: the directory's writer lock (None on the other ranks), once every rank knows that
    rank 0 may write ``final``; else every rank raises rank 0's refusal. The existence check
    comes after the lock, which makes it final: no other writer can create ``final`` meanwhile."""
    writer, refusal = None, None
    try:
        if main:
            try:
                writer = lock.acquire(root)
                if final.exists():
                    refusal = CheckpointExistsError(
                        f"{final} already exists; checkpoints are never overwritten (delete it first to save again)"
                    )
            except Exception as exc:  # noqa: BLE001 - raised below, once the other ranks learn of it
                refusal = exc
        outcome = distributed.main_outcome(f"{type(refusal).__name__}: {refusal}" if refusal else None)
        if refusal is not None:
            raise refusal
        if outcome:
            name, _, message = outcome.partition(": ")
            raise _REFUSALS[name](message) if name in _REFUSALS else CheckpointError(f"rank 0 refused to save {final}: {outcome}")
    except BaseException:
        if writer is not None:
            writer.release()
        raise
    return writer


# What rank 0's refusal to save is raised as on the other ranks (its class travels by name).
_REFUSALS = {cls.__name__: cls for cls in (CheckpointBusyError, CheckpointExistsError, CheckpointError)}


def _require_train_step(step, where: str) -> None:
    # A bare nn.Module has state_dict() too but no optimizer state: refuse it with the fix.
    if not all(hasattr(step, a) for a in ("step_count", "spec", "engine", "state_dict", "load_state_dict")):
        raise TypeError(
            f"{where}() takes the ac.TrainStep (it holds the model and the optimizer state), not a "
            f"{type(step).__name__}: pass the TrainStep you train with, e.g. ac.{where}("
            + ("step, path" if where == "save" else "path, step") + ")"
        )


def _write(step, state: dict, root: Path, final: Path, extra, keep_last: int | None) -> Path:
    """Serialise ``state`` and rename it into place as ``final`` (rank 0's part of save)."""
    aliases = find_aliases(step.model.state_dict(keep_vars=True))
    blobs = tensor_files(state, aliases)
    manifest = build_manifest(step, state, aliases, blobs, rng.capture(step.backend, state.get("rng")), extra)
    files = {**blobs, MANIFEST: manifest_bytes(manifest)}
    try:
        # The manifest goes last: its presence is what makes a step-* directory complete.
        durable.commit(root, final, files, last=MANIFEST)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CheckpointError(durable.no_space_message(root, sum(map(len, files.values())), keep_last)) from exc
    log.info("anychip: saved update %d to %s", state["step"], final)
    return final


def load(path, step, *, at: int | None = None, restore_rng: bool = True, allow_optimizer_change: bool = False) -> CheckpointInfo:
    """Restore ``step`` from the newest complete checkpoint in ``path`` (or update ``at``, or
    ``path`` itself when it is one checkpoint's directory), on whichever backend ``step`` uses.

    Everything is verified before the step is modified; each problem raises its own
    :class:`CheckpointError` subclass. ``restore_rng`` restores the torch / numpy / python
    global RNG states saved with it, and the device generator's through ``step.backend``.
    A different optimizer *type* is always refused; different hyper-parameters or schedule
    only with ``allow_optimizer_change=True``.
    """
    _require_train_step(step, "load")
    directory = resolve(Path(path), at)
    manifest, tensors = read_verified(directory)
    state = check_fits(directory, manifest, tensors, step, allow_optimizer_change)
    saved_rng = rng.parse(directory, manifest.get("rng", {}), step.backend) if restore_rng else None
    # Verified; from here on the step changes. Generators first: one the checkpoint has no
    # state for (it was saved on another backend) is then derived from torch's restored one.
    if saved_rng is not None:
        rng.apply(saved_rng, step.backend)
        state = {**state, "rng": saved_rng["engine"]}
    step.load_state_dict(state)
    log.info("anychip: loaded update %d from %s (written on %s)", state["step"], directory, manifest.get("backend"))
    return CheckpointInfo(
        directory, state["step"], int(manifest["data_position"]), str(manifest.get("backend", "?")),
        str(manifest.get("precision", "?")), manifest.get("extra"), manifest,
    )


def verify(path, *, at: int | None = None) -> dict:
    """Check one checkpoint's format, manifest and file checksums without a step; return its manifest."""
    manifest, _ = read_verified(resolve(Path(path), at))
    return manifest


__all__ = [
    "CheckpointBusyError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointVersionError",
    "checkpoints",
    "load",
    "save",
    "verify",
]
