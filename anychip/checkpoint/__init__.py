"""Backend-neutral checkpoints: ``ac.save(step, "ckpt/")`` on one chip, ``ac.load("ckpt/", step)``
on any other, on any number of processes.

On disk, ``path`` is a directory of checkpoints, one sub-directory per save::

    ckpt/step-000000120/rank-00000.safetensors  the tensors rank 0 wrote (all of them on one process)
                        rank-00001.safetensors  rank 1's: its FSDP shards, its share of the rest
                        manifest.json           everything else, as plain JSON

The tensors are those of ``TrainStep.state_dict(sharded=True)`` in the neutral layout
(``model/<parameter name>``, ``optimizer/<slot>/<parameter name>``), written through
``torch.distributed.checkpoint`` (:mod:`~anychip.checkpoint.shards`): each rank the chunks it
holds, in parallel, and a load on any number of ranks, or on JAX, reads the chunks that overlap
what it holds. Precision ``bf16`` stores its float32 master weights and ``bf16-pure`` its
bfloat16 ones. Loading verifies first and applies second: the step is only touched once the
format, the fit of every tensor name, shape and dtype, and the checksum of every byte read have
passed. ``asynchronous=True`` writes in a thread after a copy (:mod:`~anychip.checkpoint.background`).
Format 1 checkpoints (``model.safetensors`` + ``optimizer.safetensors``, written whole by one
process) still load.

This module is the public API; the work is in :mod:`~anychip.checkpoint.format` (the manifest),
:mod:`~anychip.checkpoint.shards` (the tensor files), :mod:`~anychip.checkpoint.layout` (names
and finding checkpoints), :mod:`~anychip.checkpoint.durable` (crash-safe writes and rotation),
:mod:`~anychip.checkpoint.integrity` (verifying format 1), :mod:`~anychip.checkpoint.fit` (does
it fit the step) and :mod:`~anychip.checkpoint.rng`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from anychip import distributed
from anychip.checkpoint import background, durable, format, lock, rng, shards
from anychip.checkpoint.background import SaveHandle
from anychip.checkpoint.fit import check_fits
from anychip.checkpoint.format import MANIFEST, build_manifest, find_aliases, flat_tensors, manifest_bytes, read_manifest, safetensors
from anychip.checkpoint.integrity import read_verified
from anychip.validate import flag
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


def save(step, path, *, keep_last: int | None = None, extra: Any = None, asynchronous: bool = False):
    """Write ``step``'s training state to ``path/step-NNNNNNNNN/`` atomically; return that directory.

    ``keep_last=K`` then removes all but the K newest complete checkpoints. ``extra`` is any
    JSON-serialisable value stored in the manifest and returned by :func:`load`.
    Raises :class:`CheckpointExistsError` rather than replace a checkpoint of the same update,
    and :class:`CheckpointBusyError` while another process saves to ``path`` (one writer per
    directory; threads of one process take turns).

    ``asynchronous=True`` returns a :class:`SaveHandle` as soon as the state is copied aside;
    a thread writes it (``handle.wait()`` for the directory). One save is in flight at a time:
    the next one waits for it first, and raises its error if it failed unseen.

    Under torchrun every process calls it and writes the chunks it holds (its FSDP shards, its
    share of replicated tensors) into the same directory, in parallel; rank 0 then commits the
    whole checkpoint with one rename, and every process returns or raises with that outcome.
    Under jax.distributed process 0 writes (the JAX state is whole on every process).
    """
    _require_train_step(step, "save")
    if keep_last is not None and not (isinstance(keep_last, int) and not isinstance(keep_last, bool) and keep_last >= 1):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    flag("asynchronous", asynchronous, owner="save")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra must be JSON-serialisable (dicts, lists, str, numbers): {exc}") from None
    safetensors()  # a missing dependency fails before any process has done anything
    collective = distributed.torch_processes() > 1
    if asynchronous and distributed.world_size() > 1 and not collective:
        raise CheckpointError("save(asynchronous=True) under jax.distributed is not supported: save synchronously there")
    background.settle_previous()
    root = Path(path)
    final = root / dir_name(step.step_count)
    main = distributed.is_main_process()
    writer = _claim(root, final, main)
    try:
        state = step.state_dict(sharded=True)
        aliases = find_aliases(step.model.state_dict(keep_vars=True))
        tensors = flat_tensors(state, aliases)
        # Every rank's generators (they differ where ranks drew differently: dropout masks), now.
        own = rng.capture(step.backend, state.get("rng"))
        rngs = distributed.all_ranks(own) if collective else [own]
        job = _Job(step, state, aliases, root, final, extra, keep_last, rngs, collective, main)
        if not asynchronous:
            return job.run(tensors, group=None)
        group = distributed.side_group() if collective else None
        tensors = background.snapshot(tensors)
        release, writer = (writer.release if writer is not None else (lambda: None)), None
        return background.start(final, step.step_count, lambda: job.run(tensors, group), release)
    finally:
        if writer is not None:
            writer.release()


class _Job:
    """One save's writing: every rank's chunks through DCP, then rank 0's manifest and commit."""

    def __init__(self, step, state, aliases, root, final, extra, keep_last, rngs, collective, main):
        self.root, self.final, self.keep_last, self.collective, self.main = root, final, keep_last, collective, main
        self.update = int(state["step"])
        # Everything but the files' records, taken now: the step trains on while a thread writes.
        # "rng" is rank 0's: what a load on another number of ranks gives every rank.
        ranks = {"world_size": len(rngs), **({"rng_ranks": rngs} if len(rngs) > 1 else {})}
        self.manifest = build_manifest(step, state, aliases, {}, rngs[0], extra, ranks) if main else None

    def run(self, tensors: dict, group) -> Path:
        tmp, refusal = None, None
        if self.main:
            try:
                tmp = durable.start(self.root, self.final)
            except OSError as exc:
                refusal = durable.refusal(exc, self.root, 0, self.keep_last)
            except Exception as exc:  # noqa: BLE001 - raised below, once the other ranks learn of it
                refusal = exc
        if self.collective:
            # Rank 0's temporary directory, or its error: every rank writes there or stops.
            mine = (str(tmp), None) if refusal is None else (None, f"{type(refusal).__name__}: {refusal}")
            where, error = distributed.from_main(mine, group)
            if refusal is not None:
                raise refusal
            if error is not None:
                raise CheckpointError(f"rank 0 could not start writing {self.final}: {error}")
            tmp = Path(where)
        elif refusal is not None:
            raise refusal
        try:
            if self.collective or self.main:
                files = self._write_tensors(tmp, tensors, group)
            if not self.main:
                error = distributed.main_outcome(None, group)
                if error:
                    raise CheckpointError(f"rank 0 could not write {self.final}: {error}")
                return self.final
            try:
                self._commit(tmp, files)
            except BaseException as exc:
                distributed.main_outcome(f"{type(exc).__name__}: {exc}", group)
                raise
            distributed.main_outcome(None, group)
        except BaseException:
            if tmp is not None and self.main:
                durable.discard(tmp)
            raise
        if self.keep_last is not None:
            durable.rotate(self.root, self.keep_last, keep=self.final)
        return self.final

    def _write_tensors(self, tmp: Path, tensors: dict, group) -> dict:
        import torch.distributed.checkpoint as dcp

        w = shards.writer(tmp)
        shards.quiet_single_process()
        try:
            dcp.save(tensors, storage_writer=w, process_group=group, no_dist=not self.collective)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            inner = shards.unwrap(exc)
            if distributed.is_collective_failure(exc) or distributed.is_collective_failure(inner):
                raise distributed.peer_failure(exc, f"saving {self.final}") from exc
            if isinstance(inner, OSError):
                needed = sum(t.numel() * t.element_size() for t in tensors.values())
                raise durable.refusal(inner, self.root, needed, self.keep_last) from inner
            if inner is exc:
                raise
            raise inner from exc
        return w.records

    def _commit(self, tmp: Path, files: dict) -> None:
        manifest = {**self.manifest, "files": files}
        try:
            # The manifest goes last: its presence is what makes a step-* directory complete.
            durable.finish(tmp, self.root, self.final, MANIFEST, manifest_bytes(manifest))
        except OSError as exc:
            raise durable.refusal(exc, self.root, sum(f["bytes"] for f in files.values()), self.keep_last) from exc
        log.info("anychip: saved update %d to %s", self.update, self.final)


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
    flag("restore_rng", restore_rng, owner="load")
    flag("allow_optimizer_change", allow_optimizer_change, owner="load")
    directory = resolve(Path(path), at)
    manifest = read_manifest(directory)
    if format.parse_version(manifest.get("format_version"), directory)[0] == 1:
        manifest, tensors = read_verified(directory)
        state = check_fits(directory, manifest, tensors, step, allow_optimizer_change)
    else:
        state = _read_shards(directory, manifest, step, allow_optimizer_change)
    saved_rng = rng.parse(directory, _rng_of_this_rank(manifest), step.backend) if restore_rng else None
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


def _rng_of_this_rank(manifest: dict) -> dict:
    """The generators this rank resumes with: its own where the checkpoint was written by as
    many ranks as there are now, else rank 0's (the same on every rank, as a fresh run seeds)."""
    per_rank = manifest.get("rng_ranks")
    here = distributed.torch_processes()
    if isinstance(per_rank, list) and len(per_rank) == here > 1:
        return per_rank[distributed.rank()]
    if isinstance(per_rank, list) and len(per_rank) != here:
        log.info("anychip: load: the checkpoint was written by %d ranks, resumed on %d: every rank takes rank 0's generators",
                 len(per_rank), here)
    return manifest.get("rng", {})


def _read_shards(directory: Path, manifest: dict, step, allow_optimizer_change: bool) -> dict:
    """The state to apply from a format-2 checkpoint: fitted to the step on the manifest alone,
    then each tensor read (this rank's part of it, checksums verified) into new memory laid out
    as the step holds it: a DTensor shard under FSDP, a whole tensor otherwise."""
    import torch
    import torch.distributed.checkpoint as dcp

    shapes = format.listed_tensors(manifest, directory)
    files = format.section(manifest, directory, "files")
    read = shards.reader(directory, files, shapes)  # the listing's shape checked before anything is read
    placeholders = {key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for key, (shape, dtype) in shapes.items()}
    stored = {
        file: {k[len(prefix):]: t for k, t in placeholders.items() if k.startswith(prefix)}
        for file, prefix in ((format.MODEL_FILE, format.MODEL_PREFIX), (format.OPTIMIZER_FILE, format.OPTIMIZER_PREFIX))
    }
    state = check_fits(directory, manifest, stored, step, allow_optimizer_change)
    key_of = {id(t): key for key, t in placeholders.items()}
    # Where the step holds DTensors (FSDP), each stored tensor is read as the shard of it this
    # rank holds: the model's by name, an optimizer slot's as its parameter's.
    params = dict(zip(step.engine.param_names, getattr(step.engine, "params", [])))
    live = {}
    if any(hasattr(p, "device_mesh") for p in params.values()):
        live = {f"{format.MODEL_PREFIX}{k}": v for k, v in step.model.state_dict().items()}
        for key in shapes:
            if key.startswith(format.OPTIMIZER_PREFIX):
                live.setdefault(key, params.get(key.split("/", 2)[2]))
    targets = {key: _target(live.get(key), shapes[key]) for key in shapes}
    shards.quiet_single_process()
    try:
        dcp.load(targets, storage_reader=read, no_dist=distributed.torch_processes() == 1)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        inner = shards.unwrap(exc)
        if distributed.is_collective_failure(exc) or distributed.is_collective_failure(inner):
            raise distributed.peer_failure(exc, f"loading {directory}") from exc
        if inner is exc:
            raise
        raise inner from exc

    def swap(tree):
        if isinstance(tree, dict):
            return {k: swap(v) for k, v in tree.items()}
        return targets[key_of[id(tree)]] if isinstance(tree, torch.Tensor) and id(tree) in key_of else tree

    return swap(state)


def _target(live, shape_dtype):
    """Empty memory for one stored tensor: this rank's shard when the step holds a DTensor of
    that shape, else the whole tensor on the CPU."""
    import torch

    shape, dtype = shape_dtype
    dtype = getattr(torch, dtype)
    if live is not None and hasattr(live, "device_mesh") and tuple(live.shape) == tuple(shape):
        from torch.distributed.tensor import empty

        return empty(shape, dtype=dtype, device_mesh=live.device_mesh, placements=live.placements)
    return torch.empty(shape, dtype=dtype)


def verify(path, *, at: int | None = None) -> dict:
    """Check one checkpoint's format, manifest and every file's and chunk's checksum without a
    step; return its manifest."""
    directory = resolve(Path(path), at)
    manifest = read_manifest(directory)
    if format.parse_version(manifest.get("format_version"), directory)[0] == 1:
        return read_verified(directory)[0]
    shards.verify_all(directory, format.section(manifest, directory, "files"), format.listed_tensors(manifest, directory))
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
    "SaveHandle",
    "checkpoints",
    "load",
    "save",
    "verify",
]
