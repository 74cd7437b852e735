"""Hostile checkpoints, in both on-disk formats: format 1 (data/format-1, written by an earlier
anychip: model.safetensors + optimizer.safetensors) and format 2 (one shard file per writing
rank, chunk checksums in the manifest). A pickle under an expected name, a path leading out of
the checkpoint, a symlink, a FIFO, a header claiming petabytes, a manifest naming a dtype that is
really a function: each is refused with a CheckpointCorruptError before anything is unpickled,
allocated or applied, and the step is untouched.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

import anychip as ac
from anychip import checkpoint
from anychip.checkpoint import CheckpointCorruptError
from format1_model import batch, make_step
from support import requires, resign_manifest

pytestmark = requires("safetensors")

FORMAT_1 = Path(__file__).parent / "data" / "format-1" / "step-000000003"


class Payload:
    """Unpickling this creates ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def resign(directory: Path, edit) -> None:
    resign_manifest(directory / "manifest.json", edit)


def record_for(m: dict, raw: bytes, like: str) -> dict:
    """What a careful attacker writes into the manifest for the bytes ``raw`` put in place of
    file ``like``: its size and hash, in that format's layout."""
    if m["format_version"].startswith("1."):
        return {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return {"bytes": len(raw), "header_bytes": 16, "header_sha256": hashlib.sha256(raw[:16]).hexdigest(),
            "tensors": m["files"][like]["tensors"]}


def make_victim(fmt: str, tmp_path: Path):
    """(checkpoint directory, one of its tensor files, a trained step of update 2)."""
    ckpt = tmp_path / "ckpt" / "step-000000003"
    if fmt == "format-1":
        shutil.copytree(FORMAT_1, ckpt)
    else:
        writer = make_step()
        for i in range(3):
            writer(batch(i))
        assert ac.save(writer, tmp_path / "ckpt") == ckpt
    target = make_step()
    for i in range(2):
        target(batch(100 + i))
    files = sorted(json.loads((ckpt / "manifest.json").read_text())["files"])
    return ckpt, files[0], target


@pytest.fixture(params=["format-1", "format-2"])
def victim(request, tmp_path):
    return make_victim(request.param, tmp_path)


@pytest.fixture
def sharded(tmp_path):
    return make_victim("format-2", tmp_path)


def refused(ckpt: Path, target, *fragments) -> None:
    before = {k: v.clone() for k, v in target.state_dict()["model"].items()}
    with pytest.raises(CheckpointCorruptError) as info:
        checkpoint.load(ckpt, target)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    assert target.step_count == 2
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict()["model"].items())
    with pytest.raises(CheckpointCorruptError):
        checkpoint.verify(ckpt)


def test_both_formats_load_and_resume_exactly(victim):
    ckpt, _, _ = victim
    step, reference = make_step(), make_step()
    for i in range(3):
        reference(batch(i))
    assert checkpoint.load(ckpt, step, restore_rng=False).step == 3
    for i in range(3, 6):
        assert step(batch(i)).loss == reference(batch(i)).loss


@pytest.mark.parametrize("resigned", [False, True])
def test_a_pickle_under_an_expected_name_never_runs(victim, tmp_path, resigned):
    ckpt, name, target = victim
    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(marker)}, ckpt / name)
    if resigned:
        raw = (ckpt / name).read_bytes()
        resign(ckpt, lambda m: m["files"].update({name: record_for(m, raw, name)}))
    refused(ckpt, target, name)
    assert not marker.exists(), "the checkpoint's pickle was executed"


@pytest.mark.parametrize("listed", ["weights.pt", "weights.pkl", "../outside.safetensors", "/tmp/abs.safetensors",
                                    "sub/inner.safetensors", ".hidden/x.safetensors"])
def test_a_file_outside_the_checkpoint_or_not_safetensors_is_never_opened(victim, tmp_path, listed):
    ckpt, name, target = victim
    marker = tmp_path / "PWNED"
    raw = (ckpt / name).read_bytes()
    torch.save({"x": Payload(marker)}, tmp_path / "weights.pt")
    resign(ckpt, lambda m: m["files"].update({listed: record_for(m, raw, name)}))
    refused(ckpt, target, repr(listed))
    assert not marker.exists()


def test_a_symlink_is_never_followed(victim, tmp_path):
    ckpt, name, target = victim
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(ckpt / name, outside)  # the very same bytes: only the link gives it away
    (ckpt / name).unlink()
    os.symlink(outside, ckpt / name)
    refused(ckpt, target, name, "not a regular file")


@pytest.mark.timeout(60)
def test_a_fifo_is_never_read(victim):
    ckpt, name, target = victim
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)  # reading it would block for ever
    refused(ckpt, target, name)


def test_a_header_claiming_petabytes_is_refused_unread(victim):
    ckpt, name, target = victim
    raw = bytearray((ckpt / name).read_bytes())
    raw[:8] = struct.pack("<Q", 1 << 50)
    (ckpt / name).write_bytes(bytes(raw))
    raw = bytes(raw)
    resign(ckpt, lambda m: m["files"].update({name: record_for(m, raw, name)}))
    refused(ckpt, target, name)


def test_a_dtype_name_that_is_a_torch_function_is_refused(victim):
    ckpt, _, target = victim
    resign(ckpt, lambda m: m["model"]["tensors"]["0.weight"].update(dtype="load"))
    refused(ckpt, target, "0.weight")


@pytest.mark.parametrize("offsets, fragment", [([5, 0], "does not fit"), ([0, 1], "does not fit")])
def test_a_chunk_outside_its_tensor_is_refused(sharded, offsets, fragment):
    ckpt, name, target = sharded
    resign(ckpt, lambda m: m["files"][name]["tensors"]["model/0.weight"].update(offsets=offsets))
    refused(ckpt, target, "model/0.weight", fragment)


def test_a_tensor_no_file_holds_is_refused_as_not_reshardable(sharded):
    ckpt, name, target = sharded
    resign(ckpt, lambda m: m["files"][name]["tensors"].pop("optimizer/exp_avg/2.bias"))
    refused(ckpt, target, "optimizer/exp_avg/2.bias", "a rank's file is missing")


def test_nothing_on_the_load_path_imports_pickle_or_calls_torch_load():
    """Statically, for every module of anychip.checkpoint: no pickle import, no torch.load, and
    no ``weights_only=False`` anywhere; the trap test below shows it at run time."""
    for source in sorted(Path(checkpoint.__file__).parent.glob("*.py")):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") for n in names), (source, names)
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads") and isinstance(node.value, ast.Name):
                assert node.value.id not in ("torch", "pickle"), (source, node.lineno)
            if isinstance(node, ast.keyword) and node.arg == "weights_only":
                raise AssertionError(f"{source}:{node.lineno} passes weights_only")


def test_loading_runs_with_every_unpickler_trapped(victim, monkeypatch):
    import pickle

    def trap(*a, **k):
        raise AssertionError("the load path unpickled something")

    ckpt, _, target = victim
    for mod, fn in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, fn, trap)
    assert checkpoint.load(ckpt, target, restore_rng=False).step == 3
    checkpoint.verify(ckpt)
