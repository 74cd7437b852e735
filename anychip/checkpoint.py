"""Backend-neutral checkpoints: ``ac.save(step, "ckpt/")`` on one chip, ``ac.load("ckpt/", step)``
on any other (issue 7).

On disk, ``path`` is a directory of checkpoints, one sub-directory per save::

    ckpt/step-000000120/model.safetensors      model.state_dict() by name (aliases stored once)
                        optimizer.safetensors  optimizer slots as "<slot>/<parameter name>"
                        manifest.json          everything else, as plain JSON (see _manifest)

Only safetensors and JSON are ever read, never ``pickle`` / ``torch.load``, so opening an
untrusted checkpoint cannot run code. The tensors are those of ``TrainStep.state_dict()``,
which every engine already produces in the neutral layout (parameters by name, optimizer
slots by slot name then parameter name); precision ``bf16`` therefore stores its float32
master weights and ``bf16-pure`` its bfloat16 ones.

Crash safety. A save writes into ``path/.tmp-...``, fsyncs every file and the directory,
renames it to ``step-NNNNNNNNN`` (atomic on POSIX) and fsyncs ``path``. A directory named
``step-*`` is therefore always complete; "latest" is found by scanning those names, with no
mutable pointer file to go stale. ``keep_last`` deletes old checkpoints only after the new
one is durable, by renaming them to ``.trash-...`` first (again atomic), so an interrupted
deletion never leaves a half-deleted ``step-*``. Leftover ``.tmp-*`` / ``.trash-*`` entries
are removed by the next save. One writer per directory (rank 0 in a distributed run).

Loading verifies first and applies second: format version, the manifest's own checksum,
every file's size and SHA-256, and every tensor name, shape and dtype against the step's
model and optimizer; the step is only touched once everything has passed.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any

from anychip import distributed

log = logging.getLogger("anychip")

FORMAT = "anychip-checkpoint"
FORMAT_VERSION = (1, 0)  # major: readers refuse a newer one; minor: additions readers may ignore
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few KB per thousand tensors; refuse absurd ones
_TMP_PREFIX, _TRASH_PREFIX = ".tmp-", ".trash-"
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors")


class CheckpointError(Exception):
    """Base class of every checkpoint problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No complete checkpoint where one was asked for."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A save would replace an existing checkpoint; checkpoints are never overwritten."""


class CheckpointCorruptError(CheckpointError):
    """A file is missing, truncated, altered, unparsable, or not safetensors/JSON."""


class CheckpointVersionError(CheckpointError):
    """The checkpoint was written in a newer major format than this anychip reads."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the step: parameter names, shapes, dtypes or optimizer differ.

    ``missing`` / ``unexpected`` / ``renamed`` / ``reshaped`` / ``retyped`` hold the details
    the message lists.
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), renamed=(), reshaped=(), retyped=(), optimizer=()):
        super().__init__(message)
        self.missing, self.unexpected, self.renamed = list(missing), list(unexpected), list(renamed)
        self.reshaped, self.retyped, self.optimizer = list(reshaped), list(retyped), list(optimizer)


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


# -- public API --------------------------------------------------------------------------------


def save(step, path, *, keep_last: int | None = None, extra: Any = None) -> Path:
    """Write ``step``'s training state to ``path/step-NNNNNNNNN/`` atomically; return that directory.

    ``keep_last=K`` then removes all but the K newest complete checkpoints. ``extra`` is any
    JSON-serialisable value stored in the manifest and returned by :func:`load`.
    Raises :class:`CheckpointExistsError` rather than replace a checkpoint of the same update.
    Under torchrun / jax.distributed every process calls it; rank 0 writes (sharded FSDP state
    is gathered whole first) and every process returns or raises with rank 0's outcome.
    """
    if keep_last is not None and not (isinstance(keep_last, int) and not isinstance(keep_last, bool) and keep_last >= 1):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra must be JSON-serialisable (dicts, lists, str, numbers): {exc}") from None
    st = _safetensors()
    root = Path(path)
    final = root / _dir_name(step.step_count)
    main = distributed.is_main_process()
    # Several processes: all of them call save() (an FSDP state is gathered collectively), rank 0
    # alone writes, and every rank learns rank 0's outcome, so none goes on as if saved.
    exists = f"{final} already exists; checkpoints are never overwritten (delete it first to save again)"
    if distributed.main_outcome(exists if main and final.exists() else None):
        raise CheckpointExistsError(exists)
    state = step.state_dict()
    if not main:
        error = distributed.main_outcome(None)
        if error:
            raise CheckpointError(f"rank 0 could not write {final}: {error}")
        return final
    try:
        written = _write(st, step, state, root, final, extra)
    except BaseException as exc:
        distributed.main_outcome(f"{type(exc).__name__}: {exc}")
        raise
    distributed.main_outcome(None)
    if keep_last is not None:
        _rotate(root, keep_last, keep=written)
    return written


def _write(st, step, state: dict, root: Path, final: Path, extra) -> Path:
    """Serialise ``state`` and rename it into place as ``final`` (the crash-safe part of save)."""
    aliases = _aliases(step.model.state_dict(keep_vars=True))
    model = {k: t for k, t in state["model"].items() if k not in aliases}
    optimizer = {f"{slot}/{name}": t for slot, by_name in state["optimizer"]["slots"].items() for name, t in by_name.items()}
    blobs = {
        MODEL_FILE: st.save({k: t.contiguous() for k, t in model.items()}, metadata={"format": "pt", "anychip": "model"}),
        OPTIMIZER_FILE: st.save({k: t.contiguous() for k, t in optimizer.items()}, metadata={"format": "pt", "anychip": "optimizer"}),
    }
    manifest = _manifest(step, state, aliases, blobs, extra)

    _make_dirs(root)
    _remove_leftovers(root)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name, data in blobs.items():
            _write_durable(tmp / name, data)
        _write_durable(tmp / MANIFEST, _manifest_bytes(manifest))  # last: its presence means complete
        _fsync_dir(tmp)
        if final.exists():  # re-checked right before the rename, which would replace an empty dir
            raise CheckpointExistsError(f"{final} appeared while saving; checkpoints are never overwritten")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    log.info("anychip: saved update %d to %s", state["step"], final)
    return final


def load(path, step, *, at: int | None = None, restore_rng: bool = True, allow_optimizer_change: bool = False) -> CheckpointInfo:
    """Restore ``step`` from the newest complete checkpoint in ``path`` (or update ``at``, or
    ``path`` itself when it is one checkpoint's directory), on whichever backend ``step`` uses.

    Everything is verified before the step is modified; each problem raises its own
    :class:`CheckpointError` subclass. ``restore_rng`` restores the torch / numpy / python
    global RNG states saved with it. A different optimizer *type* is always refused;
    different hyper-parameters or schedule only with ``allow_optimizer_change=True``.
    """
    directory = _resolve(Path(path), at)
    manifest, tensors = _read_verified(directory)
    state = _check_fits(directory, manifest, tensors, step, allow_optimizer_change)
    rng = _parse_rng(directory, manifest.get("rng", {})) if restore_rng else None
    # Verified; from here on the step changes.
    step.load_state_dict(state)
    if rng is not None:
        _apply_rng(rng)
    log.info("anychip: loaded update %d from %s (written on %s)", state["step"], directory, manifest.get("backend"))
    return CheckpointInfo(
        directory, state["step"], int(manifest["data_position"]), str(manifest.get("backend", "?")),
        str(manifest.get("precision", "?")), manifest.get("extra"), manifest,
    )


def checkpoints(path) -> list[Path]:
    """The complete checkpoints in ``path``, oldest update first (temporary dirs excluded)."""
    root = Path(path)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        n = _step_of(entry.name)
        if n is not None and (entry / MANIFEST).is_file():
            found.append((n, entry))
    return [p for _, p in sorted(found)]


def verify(path, *, at: int | None = None) -> dict:
    """Check one checkpoint's format, manifest and file checksums without a step; return its manifest."""
    directory = _resolve(Path(path), at)
    manifest, _ = _read_verified(directory)
    return manifest


# -- naming and scanning -------------------------------------------------------------------------


def _dir_name(n: int) -> str:
    return f"step-{n:09d}"


def _step_of(name: str) -> int | None:
    """The update of a checkpoint directory name; None for anything else (non-canonical too)."""
    m = _CHECKPOINT_NAME.fullmatch(name)
    if m is None or _dir_name(int(m.group(1))) != name:
        return None
    return int(m.group(1))


def _resolve(path: Path, at: int | None) -> Path:
    if at is None and ((path / MANIFEST).is_file() or _step_of(path.name) is not None and path.is_dir()):
        return path  # one checkpoint's own directory (a missing manifest is reported as such)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint directory at {path}")
    complete = checkpoints(path)
    if at is not None:
        wanted = path / _dir_name(int(at))
        if wanted in complete:
            return wanted
        have = ", ".join(str(_step_of(p.name)) for p in complete) or "none"
        raise CheckpointNotFoundError(f"no complete checkpoint of update {at} in {path} (complete ones: {have})")
    if not complete:
        partial = [e.name for e in path.iterdir() if e.name.startswith((_TMP_PREFIX, _TRASH_PREFIX))]
        note = f" (only unfinished saves: {', '.join(sorted(partial))})" if partial else ""
        raise CheckpointNotFoundError(f"no complete checkpoint in {path}{note}")
    latest = _step_of(complete[-1].name)
    newer = [e.name for e in path.iterdir() if e.is_dir() and e not in complete and (_step_of(e.name) is not None and _step_of(e.name) > latest)]
    if newer:
        log.warning("anychip: ignoring %s in %s: no %s, so not a complete checkpoint", ", ".join(sorted(newer)), path, MANIFEST)
    return complete[-1]


# -- writing -------------------------------------------------------------------------------------


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("checkpoints need safetensors: pip install 'anychip[checkpoint]'") from None
    return safetensors.torch


def _aliases(live_state: dict) -> dict:
    """{name: first name} for entries that are the same memory as an earlier one (tied
    weights): stored once, the others listed as aliases (safetensors refuses shared tensors).
    Read from the step's own model: ``state_dict()`` copies off a device separately per name."""
    aliases, seen = {}, {}
    for name, t in live_state.items():
        if not t.numel():
            continue
        try:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        except RuntimeError:
            # Lazy (XLA) tensors have no data pointer; tied weights are one Parameter object
            # (keep_vars=True hands out the objects themselves).
            key = ("object", id(t))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _describe(t) -> dict:
    return {"dtype": _dtype_name(t), "shape": list(t.shape)}


def _spec_json(obj):
    """An optimizer/schedule spec as JSON: {"type": class name, "fields": {...}} all the way down."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, "fields": {f.name: _spec_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, (tuple, list)):
        return [_spec_json(v) for v in obj]
    return obj


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    rng = {
        "torch": {"seed": torch.initial_seed(), "state": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()},
        "numpy": {"bit_generator": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return rng


def _manifest(step, state: dict, aliases: dict, blobs: dict, extra) -> dict:
    import torch

    import anychip

    n = int(state["step"])
    return {
        "format": FORMAT,
        "format_version": f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}",
        "anychip_version": anychip.__version__,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "created_unix": time.time(),
        "step": n,
        "schedule_position": n,  # updates the schedule has applied: the next lr is lr * schedule(n)
        "data_position": n,  # the next batch is workload.batch(n, ...): data is a pure function of the update
        "backend": step.backend.name,
        "precision": step.spec.policy.name,
        "optimizer": _spec_json(step.spec.optimizer),
        "rng": _rng_state(),
        "model": {"tensors": {k: _describe(t) for k, t in state["model"].items()}, "aliases": aliases},
        "optimizer_state": {
            "slots": {slot: {k: _describe(t) for k, t in by_name.items()} for slot, by_name in state["optimizer"]["slots"].items()}
        },
        "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in blobs.items()},
        "extra": extra,
    }


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _manifest_bytes(manifest: dict) -> bytes:
    # The manifest carries a checksum of itself, so a flipped byte in it is caught too.
    signed = {**manifest, "manifest_sha256": hashlib.sha256(_canonical(manifest)).hexdigest()}
    return (json.dumps(signed, indent=1, sort_keys=True) + "\n").encode()


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (created/renamed files) durable; a no-op where unsupported."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(root: Path) -> None:
    missing = []
    p = root.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    root.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):  # the new entries in each parent must be durable too
        _fsync_dir(created.parent)


def _remove_leftovers(root: Path) -> None:
    """Unfinished saves and interrupted deletions of earlier runs (single writer per directory)."""
    for entry in root.iterdir():
        if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and entry.is_dir() and not entry.is_symlink():
            log.info("anychip: removing leftover %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _rotate(root: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (never ``keep``)."""
    complete = [p for p in checkpoints(root) if p != keep]
    doomed = complete[: max(0, len(complete) - (keep_last - 1))]
    for old in doomed:
        trash = root / f"{_TRASH_PREFIX}{old.name}-{secrets.token_hex(4)}"
        os.rename(old, trash)  # atomic: a step-* directory is complete or absent, never half-deleted
    if doomed:
        _fsync_dir(root)
    for old in root.iterdir():
        if old.name.startswith(_TRASH_PREFIX):
            shutil.rmtree(old, ignore_errors=True)


# -- reading and verifying -----------------------------------------------------------------------


def _parse_version(text, directory: Path) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", str(text))
    if m is None:
        raise CheckpointCorruptError(f"{directory / MANIFEST}: format_version {text!r} is not 'MAJOR.MINOR'")
    return int(m.group(1)), int(m.group(2))


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise CheckpointCorruptError(f"{path} is {size} bytes, more than any manifest ({MAX_MANIFEST_BYTES}); refusing to read it")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is missing") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointCorruptError(f"{path} is not valid JSON ({exc}); the file is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{path} is not an anychip checkpoint manifest (format != {FORMAT!r})")
    theirs = _parse_version(manifest.get("format_version"), directory)
    ours = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"
    if theirs[0] > FORMAT_VERSION[0]:
        raise CheckpointVersionError(
            f"{directory} is in checkpoint format {theirs[0]}.{theirs[1]} (written by anychip "
            f"{manifest.get('anychip_version', '?')}); this anychip ({_our_version()}) reads format {ours} and older: upgrade anychip"
        )
    digest = manifest.get("manifest_sha256")
    if digest != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise CheckpointCorruptError(f"{path} does not match its own checksum (manifest_sha256): it was altered or damaged")
    return manifest


def _our_version() -> str:
    import anychip

    return anychip.__version__


def _section(manifest: dict, directory: Path, key: str) -> dict:
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise CheckpointCorruptError(f"{directory / MANIFEST}: section {key!r} is missing")
    return value


def _read_verified(directory: Path) -> tuple[dict, dict]:
    """The manifest and every tensor, after format, checksum and consistency checks."""
    st = _safetensors()
    manifest = _read_manifest(directory)
    files = _section(manifest, directory, "files")
    for need in (MODEL_FILE, OPTIMIZER_FILE):
        if need not in files:
            raise CheckpointCorruptError(f"{directory / MANIFEST} lists no {need}")
    for name, meta in files.items():
        # Only safetensors is ever parsed; a manifest naming anything else (a .pt/.pkl pickle,
        # a path outside the directory) is refused before the file is even opened.
        if not isinstance(name, str) or not _SAFE_FILE_NAME.fullmatch(name):
            raise CheckpointCorruptError(
                f"{directory / MANIFEST} lists {name!r}: a checkpoint holds only plain *.safetensors files next to "
                "its manifest (anychip never loads pickles such as .pt/.pkl)"
            )
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)):
            raise CheckpointCorruptError(f"{directory / MANIFEST}: entry for {name} lacks bytes/sha256")
    for name, meta in files.items():  # cheap checks of every file before hashing any
        try:
            info = (directory / name).stat()
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{directory / name} is missing (the manifest lists it)") from None
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise CheckpointCorruptError(f"{directory / name} is not a regular file")
        size = info.st_size
        if size != meta["bytes"]:
            how = "truncated" if size < meta["bytes"] else "longer than written"
            raise CheckpointCorruptError(f"{directory / name} is {size} bytes, the manifest says {meta['bytes']}: the file is {how}")
    tensors = {}
    for name, meta in files.items():
        with open(directory / name, "rb") as fh:
            data = fh.read(meta["bytes"] + 1)
        if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CheckpointCorruptError(f"{directory / name} does not match its SHA-256 in the manifest: the file was altered or damaged")
        try:
            # Parsed from the very bytes just hashed (no window to swap the file in between).
            tensors[name] = st.load(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise CheckpointCorruptError(f"{directory / name} is not a valid safetensors file ({exc}); it is never unpickled") from None
    _check_listing(directory, manifest, tensors)
    return manifest, tensors


def _check_listing(directory: Path, manifest: dict, tensors: dict) -> None:
    """The files hold exactly the tensors the manifest describes."""
    model = _section(manifest, directory, "model")
    listed, aliases = model.get("tensors"), model.get("aliases", {})
    if not isinstance(listed, dict) or not isinstance(aliases, dict):
        raise CheckpointCorruptError(f"{directory / MANIFEST}: 'model' lacks its tensor listing")
    slots = _section(manifest, directory, "optimizer_state").get("slots")
    if not isinstance(slots, dict) or not all(isinstance(v, dict) for v in slots.values()):
        raise CheckpointCorruptError(f"{directory / MANIFEST}: 'optimizer_state' lacks its slot listing")
    expect_model = {k: v for k, v in listed.items() if k not in aliases}
    expect_opt = {f"{slot}/{name}": meta for slot, by_name in slots.items() for name, meta in by_name.items()}
    for fname, expect in ((MODEL_FILE, expect_model), (OPTIMIZER_FILE, expect_opt)):
        have = tensors[fname]
        if set(have) != set(expect):
            extra, lacking = sorted(set(have) - set(expect)), sorted(set(expect) - set(have))
            raise CheckpointCorruptError(f"{directory / fname} disagrees with the manifest: extra {extra}, missing {lacking}")
        for key, meta in expect.items():
            if not isinstance(meta, dict) or _describe(have[key]) != {"dtype": meta.get("dtype"), "shape": meta.get("shape")}:
                raise CheckpointCorruptError(f"{directory / fname}: tensor {key} is {_describe(have[key])}, the manifest says {meta}")
    for alias, target in aliases.items():
        if target not in expect_model or listed.get(alias) != listed.get(target):
            raise CheckpointCorruptError(f"{directory / MANIFEST}: alias {alias} -> {target} names no stored tensor of its shape")
    for key in ("step", "data_position"):
        if not isinstance(manifest.get(key), int) or manifest[key] < 0:
            raise CheckpointCorruptError(f"{directory / MANIFEST}: {key!r} must be an int >= 0")


# -- fitting to the step -------------------------------------------------------------------------


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _diff_names(have: dict, want: dict) -> dict:
    """Compare {name: (shape, dtype)} of the checkpoint (``have``) and the model (``want``)."""
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    renamed = []
    for new in list(missing):
        candidates = [old for old in unexpected if have[old] == want[new]]
        if candidates:
            old = max(candidates, key=lambda c: difflib.SequenceMatcher(None, c, new).ratio())
            renamed.append((old, new))
            missing.remove(new)
            unexpected.remove(old)
    common = sorted(set(have) & set(want))
    reshaped = [(k, have[k][0], want[k][0]) for k in common if have[k][0] != want[k][0]]
    retyped = [(k, have[k][1], want[k][1]) for k in common if have[k][0] == want[k][0] and have[k][1] != want[k][1]]
    return {"missing": missing, "unexpected": unexpected, "renamed": renamed, "reshaped": reshaped, "retyped": retyped}


def _mismatch_message(directory: Path, what: str, d: dict, hint: str = "") -> str:
    parts = []
    if d["renamed"]:
        parts.append("renamed (checkpoint -> model): " + ", ".join(f"{a} -> {b}" for a, b in d["renamed"]))
    if d["reshaped"]:
        parts.append("reshaped (checkpoint vs model): " + ", ".join(f"{k} {_fmt_shape(a)} vs {_fmt_shape(b)}" for k, a, b in d["reshaped"]))
    if d["retyped"]:
        parts.append("dtype (checkpoint vs model): " + ", ".join(f"{k} {a} vs {b}" for k, a, b in d["retyped"]))
    if d["missing"]:
        parts.append("missing from the checkpoint: " + ", ".join(d["missing"]))
    if d["unexpected"]:
        parts.append("not in the model: " + ", ".join(d["unexpected"]))
    return f"{directory} does not fit this step's {what}: " + "; ".join(parts) + (f". {hint}" if hint else "")


def _optimizer_diff(theirs, ours, prefix: str = "") -> list[str]:
    if isinstance(theirs, dict) and isinstance(ours, dict):
        out = []
        for k in sorted(set(theirs) | set(ours)):
            key = k if k in ("type", "fields") else f"{prefix}{k}"
            if k == "fields":
                out += _optimizer_diff(theirs.get(k), ours.get(k), prefix)
            elif k == "type":
                if theirs.get(k) != ours.get(k):
                    out.append(f"{prefix.rstrip('.') or 'optimizer'} type: checkpoint {theirs.get(k)}, step {ours.get(k)}")
            else:
                out += _optimizer_diff(theirs.get(k), ours.get(k), f"{key}.")
        return out
    if theirs != ours:
        return [f"{prefix.rstrip('.')}: checkpoint {theirs!r}, step {ours!r}"]
    return []


def _check_fits(directory: Path, manifest: dict, tensors: dict, step, allow_optimizer_change: bool) -> dict:
    """The state dict to apply, once names, shapes, dtypes and the optimizer all fit the step."""
    ours = json.loads(json.dumps(_spec_json(step.spec.optimizer)))
    theirs = manifest.get("optimizer")
    differences = _optimizer_diff(theirs, ours)
    if differences:
        type_changed = not isinstance(theirs, dict) or theirs.get("type") != ours["type"]
        if type_changed or not allow_optimizer_change:
            hint = "" if type_changed else " (pass allow_optimizer_change=True to resume with the new settings)"
            raise CheckpointMismatchError(
                f"{directory} was trained with a different optimizer: " + "; ".join(differences) + hint, optimizer=differences
            )
        log.warning("anychip: resuming %s with a changed optimizer: %s", directory, "; ".join(differences))

    model_state = step.model.state_dict()
    want = {k: (tuple(v.shape), _dtype_name(v)) for k, v in model_state.items()}
    listed = manifest["model"]["tensors"]
    have = {k: (tuple(v["shape"]), v["dtype"]) for k, v in listed.items()}
    d = _diff_names(have, want)
    if any(d.values()):
        hint = ""
        if d["retyped"]:
            hint = f"the checkpoint was written with precision {manifest.get('precision')!r}, the step uses {step.spec.policy.name!r}"
        raise CheckpointMismatchError(_mismatch_message(directory, "model", d, hint), **d)

    stored = tensors[MODEL_FILE]
    aliases = manifest["model"].get("aliases", {})
    model = {k: stored[aliases.get(k, k)] for k in listed}

    trainable = _trainable(step)
    slots: dict[str, dict] = {}
    for key, t in tensors[OPTIMIZER_FILE].items():
        slot, _, name = key.partition("/")
        slots.setdefault(slot, {})[name] = t
    for slot in step.spec.optimizer.slots:
        slots.setdefault(slot, {})
    unknown_slots = sorted(set(slots) - set(step.spec.optimizer.slots))
    if unknown_slots and not allow_optimizer_change:
        raise CheckpointMismatchError(f"{directory} holds optimizer slots {unknown_slots} that {ours['type']} does not use")
    slots = {s: slots[s] for s in step.spec.optimizer.slots}
    for slot, by_name in slots.items():
        have = {k: (tuple(t.shape), _dtype_name(t)) for k, t in by_name.items()}
        d = {
            "missing": [], "renamed": [],
            "unexpected": sorted(set(have) - set(trainable)),
            "reshaped": [(k, have[k][0], trainable[k][0]) for k in sorted(have) if k in trainable and have[k][0] != trainable[k][0]],
            "retyped": [(k, have[k][1], trainable[k][1]) for k in sorted(have) if k in trainable and have[k][0] == trainable[k][0] and have[k][1] != trainable[k][1]],
        }
        if any(d.values()):
            raise CheckpointMismatchError(_mismatch_message(directory, f"optimizer slot {slot!r}", d), **d)
    return {"step": int(manifest["step"]), "model": model, "optimizer": {"slots": slots}}


def _trainable(step) -> dict:
    """{name: (shape, dtype)} of the parameters the optimizer updates, in the engine's naming."""
    named = dict(step.model.named_parameters())
    names = getattr(step.engine, "param_names", None) or [n for n, p in named.items() if p.requires_grad]
    return {n: (tuple(named[n].shape), _dtype_name(named[n])) for n in names}


# -- RNG -----------------------------------------------------------------------------------------


def _parse_rng(directory: Path, rng: dict) -> dict:
    """Saved RNG states, validated and converted, ready to apply (nothing applied yet)."""
    import numpy as np
    import torch

    where = directory / MANIFEST
    try:
        out = {}
        if "torch" in rng:
            raw = base64.b64decode(rng["torch"]["state"], validate=True)
            if len(raw) != torch.get_rng_state().numel():
                raise ValueError(f"torch RNG state of {len(raw)} bytes")
            out["torch"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if "torch_cuda" in rng:
            out["torch_cuda"] = [torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8) for s in rng["torch_cuda"]]
        if "numpy" in rng:
            s = rng["numpy"]
            keys = np.asarray(s["keys"], dtype=np.uint32)
            if s["bit_generator"] != "MT19937" or keys.shape != (624,):
                raise ValueError("numpy state is not MT19937 with 624 keys")
            out["numpy"] = (s["bit_generator"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"]))
        if "python" in rng:
            s = rng["python"]
            internal = tuple(int(v) for v in s["internal"])
            gauss = s["gauss_next"]
            if len(internal) != 625 or not (gauss is None or isinstance(gauss, float)):
                raise ValueError("python random state is not 625 ints")
            out["python"] = (int(s["version"]), internal, gauss)
        return out
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointCorruptError(f"{where}: saved RNG state is unusable ({exc})") from None


def _apply_rng(rng: dict) -> None:
    import random

    import numpy as np
    import torch

    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "torch_cuda" in rng and torch.cuda.is_available() and torch.cuda.device_count() == len(rng["torch_cuda"]):
        torch.cuda.set_rng_state_all(rng["torch_cuda"])
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "python" in rng:
        random.setstate(rng["python"])


__all__ = [
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
