"""Sharded checkpoints under ``torchrun --nproc-per-node 2`` (CPU, gloo): an FSDP save writes
each rank's shards into that rank's own file, nothing gathered; the checkpoint resumes on 2
ranks (FSDP, DDP), on one process and on ``jax:cpu``, and a one-process checkpoint resumes
under FSDP; the next losses equal the uninterrupted run's. A rank killed in the middle of a
sharded save makes the other fail fast, and the previous checkpoint stays loadable.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest

import anychip as ac
import support
from anychip import checkpoint
from support import requires
from torchrun_worker import batches, make_step

pytestmark = requires("safetensors")

WORKER = pathlib.Path(__file__).parent / "sharded_worker.py"
SAVE_AT, RESUMED = 3, 3


def close(a, b, tol):
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("out")
    # The one-process run: its checkpoint is resumed under FSDP, its continuation the reference.
    w, single = make_step("gpt-tiny", None)
    for b in batches(w, 0, SAVE_AT):
        single(b)
    ac.save(single, root / "single")
    single_after = [single(b).loss for b in batches(w, SAVE_AT, SAVE_AT + RESUMED)]
    done, _ = support.torchrun(WORKER, "matrix", str(root), str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return root, reports, single_after


def test_each_rank_wrote_its_own_shards_and_no_rank_the_whole_model(launched):
    root, reports, _ = launched
    saved = pathlib.Path(reports[0]["saved"])
    assert [r["saved"] for r in reports] == [str(saved)] * 2
    assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "rank-00000.safetensors", "rank-00001.safetensors"]
    m = json.loads((saved / "manifest.json").read_text())
    assert m["world_size"] == 2 and len(m["rng_ranks"]) == 2
    whole = {f"model/{k}": math.prod(v["shape"]) for k, v in m["model"]["tensors"].items() if k not in m["model"]["aliases"]}
    for r in (0, 1):
        rec = m["files"][f"rank-{r:05d}.safetensors"]
        held = {k: math.prod(c["shape"]) for k, c in rec["tensors"].items() if k.startswith("model/")}
        # Rank r holds rows [r * n/2, (r+1) * n/2) of every matrix: half of it, at its offset.
        for key, n in held.items():
            chunk = rec["tensors"][key]
            if len(chunk["shape"]) == 2:
                assert n * 2 == whole[key] and chunk["offsets"][0] == r * chunk["shape"][0], (r, key, chunk)
        assert sum(held.values()) < sum(whole.values()) * 0.75, f"rank {r} wrote most of the model"
    ac.verify(saved)  # every chunk of both files against its checksum


def test_an_asynchronous_sharded_save_completes_while_training_goes_on(launched):
    _, reports, _ = launched
    for r in reports:
        assert r["async_saved"].endswith("step-000000006")
        assert close([r["async_resumed_first_loss"]], [r["next_loss_while_writing"]], 1e-6), r
    assert checkpoint.verify(pathlib.Path(reports[0]["async_saved"]))["step"] == 6


@pytest.mark.parametrize("how", ["fsdp", "ddp"])
def test_resumed_on_two_ranks_the_next_losses_equal_the_uninterrupted_run(launched, how):
    _, reports, _ = launched
    for r, report in enumerate(reports):
        assert close(report[how]["losses"], report["uninterrupted"], 1e-6), (how, report[how], report["uninterrupted"])
    # FSDP on as many ranks as wrote it: each rank reads only its own file; DDP needs both.
    want = [[f"rank-{r:05d}.safetensors"] for r in (0, 1)] if how == "fsdp" else [["rank-00000.safetensors", "rank-00001.safetensors"]] * 2
    assert [r[how]["files"] for r in reports] == want


def test_each_rank_gets_its_own_generators_back_on_as_many_ranks(launched):
    _, reports, _ = launched
    assert reports[0]["rng_at_save"] != reports[1]["rng_at_save"]  # the ranks had drawn differently
    for report in reports:
        assert report["rng_after_fsdp_resume"] == report["rng_at_save"]


def test_a_user_torch_optimizer_and_scheduler_round_trip_under_fsdp(launched):
    _, reports, _ = launched
    for report in reports:
        user = report["user_optimizer"]
        assert close(user["resumed"], user["uninterrupted"], 1e-6), user
    m = json.loads((pathlib.Path(reports[0]["user_optimizer"]["saved"]) / "manifest.json").read_text())
    assert m["lr_scheduler"]["type"] == "LambdaLR" and len(m["optimizer_state"]["groups"]) == 2
    assert sorted(m["files"]) == ["rank-00000.safetensors", "rank-00001.safetensors"]


def test_a_one_process_checkpoint_resumes_under_fsdp(launched):
    _, reports, single_after = launched
    for report in reports:
        assert close(report["single_to_fsdp"]["losses"], single_after, 1e-6), (report["single_to_fsdp"], single_after)
        assert report["single_to_fsdp"]["files"] == ["rank-00000.safetensors"]


def test_the_fsdp_checkpoint_resumes_on_one_process_without_unpickling(launched, monkeypatch):
    import pickle

    import torch

    root, reports, _ = launched

    def trap(*a, **k):
        raise AssertionError("the load path unpickled something")

    w, step = make_step("gpt-tiny", None)
    for mod, fn in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, fn, trap)
    ac.load(root / "fsdp", step, at=SAVE_AT)
    monkeypatch.undo()
    losses = [step(b).loss for b in batches(w, SAVE_AT, SAVE_AT + RESUMED)]
    assert close(losses, reports[0]["uninterrupted"], 1e-6), (losses, reports[0]["uninterrupted"])


@requires("jax", "torchax")
def test_the_fsdp_checkpoint_resumes_on_jax(launched):
    root, reports, _ = launched
    w = __import__("anychip.workloads", fromlist=["get"]).get("gpt-tiny")
    opt = ac.AdamW(lr=3e-3, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=1, total=10))
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, opt, backend="jax:cpu", max_grad_norm=0.5)
    info = ac.load(root / "fsdp", step, at=SAVE_AT)
    assert (info.step, info.backend) == (SAVE_AT, "cpu")
    losses = [step(b).loss for b in batches(w, SAVE_AT, SAVE_AT + RESUMED)]
    assert close(losses, reports[0]["uninterrupted"], 1e-5), (losses, reports[0]["uninterrupted"])


@pytest.mark.parametrize("how", ["file deleted", "left out of the manifest"])
def test_a_two_rank_checkpoint_missing_a_rank_s_shards_cannot_be_resharded(launched, tmp_path, how):
    import shutil

    root, _, _ = launched
    broken = tmp_path / "step-000000003"
    shutil.copytree(root / "fsdp" / "step-000000003", broken)
    (broken / "rank-00001.safetensors").unlink()
    if how == "left out of the manifest":
        support.resign_manifest(broken / "manifest.json", lambda m: m["files"].pop("rank-00001.safetensors"))
    w, step = make_step("gpt-tiny", None)
    with pytest.raises(checkpoint.CheckpointCorruptError) as info:
        ac.load(broken, step)
    message = str(info.value)
    assert ("rank-00001.safetensors is missing" in message) if how == "file deleted" else ("cannot be resharded" in message), message
    assert step.step_count == 0


def test_overlapping_chunks_that_would_leave_part_of_a_tensor_unread_are_refused(launched, tmp_path):
    import shutil

    root, _, _ = launched
    broken = tmp_path / "step-000000003"
    shutil.copytree(root / "fsdp" / "step-000000003", broken)
    key = "model/wte.weight"  # rank 1's rows moved onto rank 0's: as many elements, half of them twice
    support.resign_manifest(broken / "manifest.json", lambda m: m["files"]["rank-00001.safetensors"]["tensors"][key].update(offsets=[0, 0]))
    w, step = make_step("gpt-tiny", None)
    overlap = f"chunks of {key} in rank-00000.safetensors and rank-00001.safetensors overlap"
    with pytest.raises(checkpoint.CheckpointCorruptError, match=overlap):
        ac.load(broken, step)
    assert step.step_count == 0


def test_a_rank_killed_during_a_sharded_save_fails_the_other_fast_and_keeps_the_last_checkpoint(tmp_path):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    # The agent's monitor interval is stretched so that rank 0's own error is what it reports
    # (by default torchrun SIGTERMs rank 0 as soon as it sees rank 1 die).
    done, seconds = support.torchrun(WORKER, "kill", str(root), str(out), env_extra={"ANYCHIP_DIST_TIMEOUT": "10"}, monitor_s=5)
    assert done.returncode != 0
    assert not (out / "rank-1.json").exists()  # it died in the save
    report = json.loads((out / "rank-0.json").read_text())
    assert report["error"] == "DistributedError", report
    assert "rank 0/2" in report["message"] and "a collective failed" in report["message"], report
    assert report["seconds"] < 15, report
    assert [p.name for p in checkpoint.checkpoints(root)] == ["step-000000001"]
    checkpoint.verify(root / "step-000000001")
    w, step = make_step("mlp", None)
    assert ac.load(root, step).step == 1
