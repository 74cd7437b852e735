"""CheckpointInfo prints as one short line: the update, where it is, who wrote it and its size,
not the whole manifest."""

from __future__ import annotations

import re
from pathlib import Path

import anychip as ac
from anychip import workloads
from anychip.checkpoint import CheckpointInfo
from support import requires

pytestmark = requires("safetensors")


def test_repr_of_a_loaded_checkpoint_is_one_short_line(tmp_path):
    w = workloads.get("mlp")
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, backend="cpu", precision="bf16-mixed")
    for i in range(2):
        step(w.batch(i, 8, 1, 0))
    written = ac.save(step, tmp_path)
    info = ac.load(tmp_path, ac.TrainStep(w.build(seed=1), w.loss_fn, backend="cpu", precision="bf16"))
    text = repr(info)
    files = info.manifest["files"]
    total = sum(f["bytes"] for f in files.values())
    assert re.fullmatch(
        rf"CheckpointInfo\(step=2, path='{re.escape(str(written))}', backend='cpu', precision='bf16', size='[0-9.]+ (B|kB|MB)'\)", text
    ), text
    assert "\n" not in text and "sha256" not in text and len(text) < 200
    number, unit = text.rsplit("size='", 1)[1].rstrip("')").split()
    assert abs(float(number) * {"B": 1, "kB": 1e3, "MB": 1e6}[unit] - total) <= 0.05 * total


def test_repr_sizes_by_hand_and_without_files():
    def info(files):
        return CheckpointInfo(Path("runs/a/step-000000120"), 120, 120, "cuda", "fp32", None, {"files": files})

    assert repr(info({"model.safetensors": {"bytes": 3_200_000}, "optimizer.safetensors": {"bytes": 40_000}})) == (
        "CheckpointInfo(step=120, path='runs/a/step-000000120', backend='cuda', precision='fp32', size='3.2 MB')"
    )
    assert repr(info({"model.safetensors": {"bytes": 999}})).endswith("size='999 B')")
    assert repr(info({"model.safetensors": {"bytes": 1_500_000_000}})).endswith("size='1.5 GB')")
    # a manifest without a file list (an older or sharded layout): no size rather than a wrong one
    assert repr(CheckpointInfo(Path("c"), 1, 1, "cpu", "fp32", None, {})) == (
        "CheckpointInfo(step=1, path='c', backend='cpu', precision='fp32')"
    )
