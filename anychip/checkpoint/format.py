"""The on-disk format: file names, the format version, tensors to safetensors bytes, and the
manifest (built, signed with its own checksum, read back and version-checked).

Only safetensors and JSON are ever written or read, never ``pickle`` / ``torch.load``, so
opening an untrusted checkpoint cannot run code. Tensor shapes in the manifest are those of the
whole tensors; how they were cut into chunks (one file per writing rank) is in ``files``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import stat
import sys
import time
from pathlib import Path

from anychip import user_optimizer
from anychip.errors import CheckpointCorruptError, CheckpointVersionError
from anychip.version import __version__

FORMAT = "anychip-checkpoint"
# major: readers refuse a newer one; minor: additions readers may ignore. 2: each rank's chunks
# in its own file (format 1, still read: model.safetensors and optimizer.safetensors, written whole).
FORMAT_VERSION = (2, 0)
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"  # format 1
OPTIMIZER_FILE = "optimizer.safetensors"  # format 1
MODEL_PREFIX, OPTIMIZER_PREFIX = "model/", "optimizer/"  # format 2: keys in the shard files
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few KB per thousand tensors; refuse absurd ones
SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors")


def check_file_name(directory: Path, name) -> None:
    """Only a plain ``*.safetensors`` file next to the manifest is ever opened: a manifest naming
    anything else (a .pt/.pkl pickle, a path outside the directory) is refused unopened."""
    if not isinstance(name, str) or not SAFE_FILE_NAME.fullmatch(name):
        raise CheckpointCorruptError(
            f"{directory / MANIFEST} lists {name!r}: a checkpoint holds only plain *.safetensors files next to "
            "its manifest (anychip never loads pickles such as .pt/.pkl)"
        )


def check_file(path: Path, size: int) -> None:
    """``path`` is a regular file (never a symlink, which leads elsewhere, nor a FIFO or device,
    which would block or never end) of the ``size`` the manifest records."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is missing (the manifest lists it)") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointCorruptError(f"{path} is not a regular file")
    if info.st_size != size:
        how = "truncated" if info.st_size < size else "longer than written"
        raise CheckpointCorruptError(f"{path} is {info.st_size} bytes, the manifest says {size}: the file is {how}")


def safetensors():
    """``safetensors.torch``, or an ImportError that says how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("checkpoints need safetensors: pip install 'anychip[checkpoint]'") from None
    return safetensors.torch


def dtype_name(t) -> str:
    """``float32`` for ``torch.float32``: the dtype as the manifest spells it."""
    return str(t.dtype).removeprefix("torch.")


def describe(t) -> dict:
    return {"dtype": dtype_name(t), "shape": list(t.shape)}


def spec_json(obj):
    """An optimizer/schedule spec as JSON: {"type": class name, "fields": {...}} all the way down."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, "fields": {f.name: spec_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, (tuple, list)):
        return [spec_json(v) for v in obj]
    if callable(obj):  # a callable schedule or rule: recorded by name (its code is the user's)
        return f"callable {getattr(obj, '__qualname__', type(obj).__name__)}"
    return obj


def optimizer_record(step) -> dict:
    """The manifest's description of the step's optimizer, as JSON: a spec's fields (its
    ``no_decay`` rule as the parameter names it exempts), or a torch.optim optimizer's class,
    defaults and groups. Loading compares it with the step's own."""
    opt = step.spec.optimizer
    if user_optimizer.is_torch_optimizer(opt):
        record = user_optimizer.describe(opt, step.engine.names)
    else:
        record = spec_json(opt)
        if record["fields"].get("no_decay", ...) is None:
            del record["fields"]["no_decay"]  # no rule: the manifest of specs before no_decay existed
        elif getattr(opt, "no_decay", None) is not None:
            trainable = set(step.engine.param_names)
            decays = opt.decays((n, p) for n, p in step.model.named_parameters() if n in trainable)
            record["fields"]["no_decay"] = {"params": sorted(n for n, d in decays.items() if not d)}
    return json.loads(json.dumps(record))


def find_aliases(live_state: dict) -> dict:
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


def flat_tensors(state: dict, aliases: dict) -> dict:
    """The tensors of a ``TrainStep.state_dict()`` under one key each, as the shard files store
    them: ``model/<name>`` (aliases left out: stored once) and ``optimizer/<slot>/<name>``."""
    out = {f"{MODEL_PREFIX}{k}": t for k, t in state["model"].items() if k not in aliases}
    for slot, by_name in state["optimizer"]["slots"].items():
        out.update({f"{OPTIMIZER_PREFIX}{slot}/{name}": t for name, t in by_name.items()})
    return out


def listed_tensors(manifest: dict, directory: Path) -> dict:
    """{flat key: (shape, dtype name)} of every stored tensor the manifest lists (format 2)."""
    import torch

    model, slots = section(manifest, directory, "model"), section(manifest, directory, "optimizer_state").get("slots")
    listed, aliases = model.get("tensors"), model.get("aliases", {})
    if not isinstance(listed, dict) or not isinstance(aliases, dict) or not isinstance(slots, dict):
        raise CheckpointCorruptError(f"{directory / MANIFEST}: the tensor listing is missing")
    out = {}
    entries = [(f"{MODEL_PREFIX}{k}", v) for k, v in listed.items() if k not in aliases]
    for slot, by_name in slots.items():
        if not isinstance(by_name, dict):
            raise CheckpointCorruptError(f"{directory / MANIFEST}: optimizer slot {slot!r} is malformed")
        entries += [(f"{OPTIMIZER_PREFIX}{slot}/{name}", v) for name, v in by_name.items()]
    for key, meta in entries:
        dtype = getattr(torch, meta.get("dtype", ""), None) if isinstance(meta, dict) and isinstance(meta.get("dtype"), str) else None
        shape = meta.get("shape") if isinstance(meta, dict) else None
        sizes = isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        if not isinstance(dtype, torch.dtype) or not sizes:
            raise CheckpointCorruptError(f"{directory / MANIFEST}: the listing of {key} is malformed: {meta!r}")
        out[key] = (tuple(shape), meta["dtype"])
    for alias, target in aliases.items():
        if f"{MODEL_PREFIX}{target}" not in out or listed.get(alias) != listed.get(target):
            raise CheckpointCorruptError(f"{directory / MANIFEST}: alias {alias} -> {target} names no stored tensor of its shape")
    return out


def build_manifest(step, state: dict, aliases: dict, files: dict, rng: dict, extra, ranks: dict) -> dict:
    """Everything about a save that is not a tensor, as plain JSON (unsigned)."""
    import torch

    n = int(state["step"])
    return {
        "format": FORMAT,
        "format_version": f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}",
        "anychip_version": __version__,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "created_unix": time.time(),
        "step": n,
        "schedule_position": n,  # updates the schedule has applied: the next lr is lr * schedule(n)
        "data_position": n,  # the next batch is workload.batch(n, ...): data is a pure function of the update
        "backend": step.backend.name,
        "precision": step.spec.policy.name,
        "optimizer": optimizer_record(step),
        "rng": rng,
        "model": {"tensors": {k: describe(t) for k, t in state["model"].items()}, "aliases": aliases},
        "optimizer_state": {
            "slots": {slot: {k: describe(t) for k, t in by_name.items()} for slot, by_name in state["optimizer"]["slots"].items()},
            # the user's torch.optim optimizer: hyperparameters by group, non-tensor state
            **{k: state["optimizer"][k] for k in ("groups", "scalars") if k in state["optimizer"]},
        },
        "lr_scheduler": state.get("lr_scheduler"),
        "files": files,  # each shard file: size, header hash, and each chunk's place and SHA-256
        **ranks,  # world_size; rng_ranks: each rank's generators where there are several
        "extra": extra,
    }


def canonical(manifest: dict) -> bytes:
    """The bytes the manifest's own checksum covers: sorted, compact, ASCII JSON without it."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_bytes(manifest: dict) -> bytes:
    # The manifest carries a checksum of itself, so a flipped byte in it is caught too.
    signed = {**manifest, "manifest_sha256": hashlib.sha256(canonical(manifest)).hexdigest()}
    return (json.dumps(signed, indent=1, sort_keys=True) + "\n").encode()


def parse_version(text, directory: Path) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", str(text))
    if m is None:
        raise CheckpointCorruptError(f"{directory / MANIFEST}: format_version {text!r} is not 'MAJOR.MINOR'")
    return int(m.group(1)), int(m.group(2))


def read_manifest(directory: Path) -> dict:
    """The manifest of ``directory`` after its size, JSON, format, version and checksum checks."""
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
    theirs = parse_version(manifest.get("format_version"), directory)
    ours = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"
    if theirs[0] > FORMAT_VERSION[0]:
        raise CheckpointVersionError(
            f"{directory} is in checkpoint format {theirs[0]}.{theirs[1]} (written by anychip "
            f"{manifest.get('anychip_version', '?')}); this anychip ({__version__}) reads format {ours} and older: upgrade anychip"
        )
    digest = manifest.get("manifest_sha256")
    if digest != hashlib.sha256(canonical(manifest)).hexdigest():
        raise CheckpointCorruptError(f"{path} does not match its own checksum (manifest_sha256): it was altered or damaged")
    return manifest


def section(manifest: dict, directory: Path, key: str) -> dict:
    """``manifest[key]``, which must be a JSON object."""
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise CheckpointCorruptError(f"{directory / MANIFEST}: section {key!r} is missing")
    return value
