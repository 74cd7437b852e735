"""Reading a format-1 checkpoint back and proving it intact: every file the manifest lists is a plain
safetensors file of the recorded size and SHA-256, and holds exactly the tensors the manifest
describes. Nothing here knows about a step; fitting one is :mod:`anychip.checkpoint.fit`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from anychip.checkpoint.format import (
    MANIFEST,
    MODEL_FILE,
    OPTIMIZER_FILE,
    check_file,
    check_file_name,
    describe,
    read_manifest,
    safetensors,
    section,
)
from anychip.errors import CheckpointCorruptError


def read_verified(directory: Path) -> tuple[dict, dict]:
    """The manifest and every tensor (``{file name: {key: tensor}}``), after format, checksum
    and consistency checks."""
    st = safetensors()
    manifest = read_manifest(directory)
    files = section(manifest, directory, "files")
    for need in (MODEL_FILE, OPTIMIZER_FILE):
        if need not in files:
            raise CheckpointCorruptError(f"{directory / MANIFEST} lists no {need}")
    for name, meta in files.items():
        check_file_name(directory, name)
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)):
            raise CheckpointCorruptError(f"{directory / MANIFEST}: entry for {name} lacks bytes/sha256")
    for name, meta in files.items():  # cheap checks of every file before hashing any
        check_file(directory / name, meta["bytes"])
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
    check_listing(directory, manifest, tensors)
    return manifest, tensors


def check_listing(directory: Path, manifest: dict, tensors: dict) -> None:
    """The files hold exactly the tensors the manifest describes."""
    model = section(manifest, directory, "model")
    listed, aliases = model.get("tensors"), model.get("aliases", {})
    if not isinstance(listed, dict) or not isinstance(aliases, dict):
        raise CheckpointCorruptError(f"{directory / MANIFEST}: 'model' lacks its tensor listing")
    slots = section(manifest, directory, "optimizer_state").get("slots")
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
            if not isinstance(meta, dict) or describe(have[key]) != {"dtype": meta.get("dtype"), "shape": meta.get("shape")}:
                raise CheckpointCorruptError(f"{directory / fname}: tensor {key} is {describe(have[key])}, the manifest says {meta}")
    for alias, target in aliases.items():
        if target not in expect_model or listed.get(alias) != listed.get(target):
            raise CheckpointCorruptError(f"{directory / MANIFEST}: alias {alias} -> {target} names no stored tensor of its shape")
    for key in ("step", "data_position"):
        if not isinstance(manifest.get(key), int) or manifest[key] < 0:
            raise CheckpointCorruptError(f"{directory / MANIFEST}: {key!r} must be an int >= 0")
