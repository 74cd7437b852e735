"""Checkpoints under attack: SIGKILL during saves, damaged files, mismatched models, pickles.

Every failure must raise its own CheckpointError subclass with a message naming the problem,
and must leave both the step and the checkpoint exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import anychip as ac
from anychip import checkpoint
from anychip.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
)
from anychip.checkpoint.layout import dir_name, step_of
from support import requires, resign_manifest

pytestmark = requires("safetensors")


# -- a small model whose parameters can be renamed or reshaped -------------------------------------


class Net(nn.Module):
    def __init__(self, hidden=16, out=4, last="fc2"):
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.add_module(last, nn.Linear(hidden, out))
        self.last = last

    def forward(self, x):
        return getattr(self, self.last)(torch.tanh(self.fc1(x)))


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def data(n, out=4):
    g = torch.Generator().manual_seed(n)
    return torch.randn(8, 8, generator=g), torch.randn(8, out, generator=g)


def make(**net):
    torch.manual_seed(0)
    return ac.TrainStep(Net(**net), loss_fn, ac.AdamW(lr=1e-2, schedule=ac.WarmupCosine(warmup=2, total=50)), backend="cpu")


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def state_copy(step) -> dict:
    sd = step.state_dict()
    return {"step": sd["step"], "model": {k: v.clone() for k, v in sd["model"].items()},
            "slots": {s: {k: v.clone() for k, v in d.items()} for s, d in sd["optimizer"]["slots"].items()}}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys() and a["slots"].keys() == b["slots"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s in a["slots"]:
        assert a["slots"][s].keys() == b["slots"][s].keys()
        for k in a["slots"][s]:
            assert torch.equal(a["slots"][s][k], b["slots"][s][k]), (s, k)


def resign(manifest_path: Path, edit) -> None:
    resign_manifest(manifest_path, edit)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of update 3, and a trained step (update 2) it would be loaded into."""
    writer = make()
    for i in range(3):
        writer(data(i))
    ckpt = checkpoint.save(writer, tmp_path / "ckpt")
    target = make()
    for i in range(2):
        target(data(100 + i))
    return ckpt, target


def expect_refusal(ckpt: Path, target, error, *fragments, root=None):
    """Loading raises ``error`` with every fragment in its message; nothing changes anywhere."""
    before_files, before_state = tree_digest(ckpt.parent), state_copy(target)
    rng_before = torch.get_rng_state()
    with pytest.raises(error) as info:
        checkpoint.load(root or ckpt, target)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert tree_digest(ckpt.parent) == before_files, "a failed load must not write to the checkpoint"
    assert_same_state(state_copy(target), before_state)
    assert torch.equal(torch.get_rng_state(), rng_before), "a failed load must not restore RNG state"
    assert target.step_count == 2
    return info.value


# -- damaged files -------------------------------------------------------------------------------


SHARD = "rank-00000.safetensors"  # a one-process save: every tensor in this one file


def test_truncated_file(saved):
    ckpt, target = saved
    f = ckpt / SHARD
    f.write_bytes(f.read_bytes()[:-100])
    expect_refusal(ckpt, target, CheckpointCorruptError, SHARD, "truncated")


@pytest.mark.parametrize("key", ["model/fc2.bias", "optimizer/exp_avg_sq/fc1.weight"])
def test_flipped_byte_in_tensor_file(saved, key):
    from safetensors import safe_open

    ckpt, target = saved
    f = ckpt / SHARD
    raw = bytearray(f.read_bytes())
    n_header = 8 + int.from_bytes(raw[:8], "little")
    begin, _ = json.loads(raw[8:n_header])[key]["data_offsets"]
    raw[n_header + begin + 1] ^= 0x01  # inside that tensor's data: the file still parses
    f.write_bytes(bytes(raw))
    with safe_open(str(f), framework="pt") as opened:
        assert key in opened.keys()
    expect_refusal(ckpt, target, CheckpointCorruptError, SHARD, key, "SHA-256")


def test_flipped_byte_in_shard_header(saved):
    ckpt, target = saved
    f = ckpt / SHARD
    raw = bytearray(f.read_bytes())
    at = raw.index(b'"F32"') + 2  # F32 -> F33 in one tensor's entry
    raw[at] ^= 0x01
    f.write_bytes(bytes(raw))
    expect_refusal(ckpt, target, CheckpointCorruptError, SHARD, "header")


def test_flipped_byte_in_manifest(saved):
    ckpt, target = saved
    f = ckpt / "manifest.json"
    text = f.read_text()
    f.write_text(text.replace('"step": 3', '"step": 4'))  # still valid JSON, different meaning
    assert f.read_text() != text
    expect_refusal(ckpt, target, CheckpointCorruptError, "manifest.json", "checksum")


def test_missing_file(saved):
    ckpt, target = saved
    (ckpt / SHARD).unlink()
    expect_refusal(ckpt, target, CheckpointCorruptError, SHARD, "missing")


def test_missing_manifest_is_named_when_loading_that_directory(saved):
    ckpt, target = saved
    (ckpt / "manifest.json").unlink()
    expect_refusal(ckpt, target, CheckpointCorruptError, "manifest.json", "missing")
    # Scanning the parent, a directory without a manifest is not a complete checkpoint.
    expect_refusal(ckpt, target, CheckpointNotFoundError, "no complete checkpoint", root=ckpt.parent)


def test_newer_major_format(saved):
    ckpt, target = saved
    resign(ckpt / "manifest.json", lambda m: m.update(format_version="3.0", anychip_version="9.0.0"))
    err = expect_refusal(ckpt, target, CheckpointVersionError, "format 3.0", "9.0.0", "reads format 2.0", "upgrade anychip")
    assert isinstance(err, CheckpointError)


def test_newer_minor_format_loads(saved):
    ckpt, target = saved
    resign(ckpt / "manifest.json", lambda m: m.update(format_version="2.7", future_field={"x": 1}))
    assert checkpoint.load(ckpt, target, restore_rng=False).step == 3


def test_renamed_parameter(tmp_path):
    writer = make()
    writer(data(0))
    ckpt = checkpoint.save(writer, tmp_path)
    target = make(last="head")
    target(data(0)), target(data(1))
    err = expect_refusal(ckpt, target, CheckpointMismatchError, "renamed", "fc2.weight -> head.weight", "fc2.bias -> head.bias")
    assert sorted(err.renamed) == [("fc2.bias", "head.bias"), ("fc2.weight", "head.weight")]
    assert not err.missing and not err.unexpected and not err.reshaped


def test_reshaped_parameter(tmp_path):
    writer = make()
    writer(data(0))
    ckpt = checkpoint.save(writer, tmp_path)
    target = make(out=5)
    target(data(0, out=5)), target(data(1, out=5))
    err = expect_refusal(ckpt, target, CheckpointMismatchError, "reshaped", "fc2.weight (4, 16) vs (5, 16)", "fc2.bias (4,) vs (5,)")
    assert [r[0] for r in err.reshaped] == ["fc2.bias", "fc2.weight"]


def test_missing_and_unexpected_parameters(tmp_path):
    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(3, 3)

    writer = make()
    writer(data(0))
    ckpt = checkpoint.save(writer, tmp_path)
    torch.manual_seed(0)
    target = ac.TrainStep(Wider(), loss_fn, ac.AdamW(lr=1e-2, schedule=ac.WarmupCosine(warmup=2, total=50)), backend="cpu")
    target(data(0)), target(data(1))
    expect_refusal(ckpt, target, CheckpointMismatchError, "missing from the checkpoint: extra.bias, extra.weight")


# -- pickles are never executed ------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("how", ["replaced", "replaced-and-resigned", "listed-pt", "listed-pkl-path"])
def test_pickle_payload_is_never_executed(saved, tmp_path, how):
    ckpt, target = saved
    marker = tmp_path / "PWNED"
    evil = ckpt / (SHARD if how.startswith("replaced") else "weights.pt")
    torch.save({"x": Payload(marker)}, evil)
    teeth, teeth_marker = tmp_path / "teeth.pt", tmp_path / "RAN"
    torch.save({"x": Payload(teeth_marker)}, teeth)
    torch.load(teeth, weights_only=False)  # such a file does run code when unpickled
    assert teeth_marker.exists() and not marker.exists()
    manifest = ckpt / "manifest.json"
    raw = evil.read_bytes()
    # Sized and hashed as a shard record would be, its "header" the first 16 bytes.
    entry = {"bytes": len(raw), "header_bytes": 16, "header_sha256": hashlib.sha256(raw[:16]).hexdigest(),
             "tensors": json.loads(manifest.read_text())["files"][SHARD]["tensors"]}
    if how == "replaced-and-resigned":
        resign(manifest, lambda m: m["files"].update({SHARD: entry}))
    elif how == "listed-pt":
        resign(manifest, lambda m: m["files"].update({"weights.pt": entry}))
    elif how == "listed-pkl-path":
        resign(manifest, lambda m: m["files"].update({"../weights.pkl": entry}))
    fragment = {"replaced": f"{SHARD} is", "replaced-and-resigned": "header does not match",
                "listed-pt": "'weights.pt'", "listed-pkl-path": "'../weights.pkl'"}[how]
    expect_refusal(ckpt, target, CheckpointCorruptError, fragment)
    assert not marker.exists(), "the checkpoint's pickle was executed"


def test_load_path_never_unpickles(saved, monkeypatch):
    """With every unpickling entry point booby-trapped, a good checkpoint still loads."""
    import pickle

    def trap(*a, **k):
        raise AssertionError("the load path unpickled something")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, trap)
    ckpt, target = saved
    assert checkpoint.load(ckpt, target, restore_rng=False).step == 3


# -- SIGKILL during saves ------------------------------------------------------------------------

# Each label is a system call of save() (see checkpoint_writer.py); the writer kills itself
# with SIGKILL right before the n-th call with that label, so every phase is hit for certain.
KILL_POINTS = [
    ("fsync:rank-00000.safetensors", 1),  # data written, nothing durable yet
    ("unlink:tmp", 1),  # the next save removes that unfinished directory ... and dies doing it
    ("fsync:rank-00000.safetensors", 3),
    ("fsync:manifest.json", 1),
    ("fsync:tmp-dir", 2),
    ("rename:tmp->step", 1),  # complete and durable, but not yet published
    ("fsync:root", 1),  # published, not yet rotated
    ("rename:step->trash", 1),  # rotation: before the oldest checkpoint is moved away
    ("fsync:root", 2),  # rotation: moved to .trash, not yet deleted
    ("unlink:trash", 2),  # rotation: half deleted
    ("rmdir:trash", 1),
]
# make test kills 13 saves at random moments; ANYCHIP_SAVE_KILLS=N kills N for a longer check.
RANDOM_TRIALS = int(os.environ.get("ANYCHIP_SAVE_KILLS", "13"))
PRELOAD = ["torch", "torch._dynamo", "torch.optim", "safetensors.torch", "anychip", "anychip.checkpoint", "anychip.workloads"]
PHASE_DELAY_S = 0.02  # per system call, so that a save lasts ~0.25 s and random kills land inside


class Reference:
    """The uninterrupted run, computed here, that every resumed checkpoint must equal bit for bit."""

    def __init__(self):
        import checkpoint_writer as cw

        self.cw, self.step, self.states, self.losses = cw, cw.make_step(), {}, {}
        self.states[0] = state_copy(self.step)

    def at(self, n: int) -> tuple[dict, float]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the writer: the same reduction order
        try:
            while self.step.step_count <= n:
                i = self.step.step_count
                self.losses[i + 1] = self.step(self.cw.batch(i)).loss
                self.states[self.step.step_count] = state_copy(self.step)
        finally:
            torch.set_num_threads(threads)
        return self.states[n], self.losses[n + 1]


def check_after_crash(root: Path, ref: Reference, floor: int) -> int:
    """The newest complete checkpoint loads, equals the uninterrupted run, and resumes exactly."""
    import checkpoint_writer as cw

    complete = checkpoint.checkpoints(root)
    assert complete, "the previous checkpoint must survive"
    for c in complete:
        checkpoint.verify(c)  # every complete one is intact, not only the newest
    latest = int(complete[-1].name.split("-")[1])
    assert latest >= floor, f"checkpoint of update {floor} was lost; newest is {latest}"
    step = cw.make_step()
    info = checkpoint.load(root, step, restore_rng=False)
    assert info.step == latest == step.step_count
    want_state, want_next_loss = ref.at(latest)
    assert_same_state(state_copy(step), want_state)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert step(cw.batch(latest)).loss == want_next_loss
    finally:
        torch.set_num_threads(threads)
    return latest


def test_sigkill_during_save_always_leaves_a_loadable_checkpoint(tmp_path):
    import checkpoint_writer as cw

    # Writers fork from a server that has imported torch already (and torch._dynamo, which
    # torch.optim imports on first use: seconds per writer otherwise). Python 3.11's fork
    # server ignores sys.path, so only installed modules can be preloaded.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    root, ref, rng = tmp_path / "ckpt", Reference(), random.Random(7)
    checkpoint.save(ref.step, root)  # update 0: there is always a previous checkpoint
    floor, random_phases = 0, []
    trials = [("kill-at", kp) for kp in KILL_POINTS] + [("random", None)] * RANDOM_TRIALS
    for number, (kind, kill_on) in enumerate(trials):
        log = tmp_path / f"trial-{number}.log"
        proc = ctx.Process(target=cw.write_forever, args=(str(root), str(log), kill_on, PHASE_DELAY_S), daemon=True)
        proc.start()
        if kind == "random":
            deadline = time.monotonic() + 60
            while not (log.exists() and log.read_text().startswith("ready")):
                assert time.monotonic() < deadline and proc.is_alive(), log.read_text() if log.exists() else "no log"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.8))
            proc.kill()
        proc.join(30)
        if proc.is_alive():  # it never reached its kill point
            proc.kill()
            proc.join()
        lines = log.read_text().splitlines()
        assert proc.exitcode == -9, f"trial {number} ({kill_on}): writer ended with {proc.exitcode}: {lines[-3:]}"
        last = lines[-1]
        if kind == "kill-at":
            assert last == kill_on[0], f"trial {number}: the writer never reached {kill_on}; last phase {last}"
        else:
            random_phases.append(last)
        floor = check_after_crash(root, ref, floor)
    # Random kills are spread over the phases of a save, not all in one place.
    assert len({p for p in random_phases if not p.startswith(("ready", "saved"))}) >= 3, random_phases

    clean_run_tidies_up(ctx, root, ref, floor, tmp_path / "final.log", asynchronous=False)


def clean_run_tidies_up(ctx, root: Path, ref, floor: int, log: Path, asynchronous: bool) -> None:
    """A clean run after the kills removes every leftover and keeps exactly keep_last checkpoints."""
    import checkpoint_writer as cw

    proc = ctx.Process(target=cw.write_forever, args=(str(root), str(log), None, 0.0, 2), kwargs={"asynchronous": asynchronous})
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0, log.read_text()
    # The lock file stays (a writer that dies cannot remove it; the kernel already released it).
    assert sorted(p.name for p in root.iterdir()) == [".lock"] + [c.name for c in checkpoint.checkpoints(root)]
    assert len(checkpoint.checkpoints(root)) == cw.KEEP_LAST
    check_after_crash(root, ref, floor + 2)


# make test kills 50 asynchronous saves; ANYCHIP_ASYNC_SAVE_KILLS=N kills N for a longer check.
RANDOM_ASYNC_TRIALS = int(os.environ.get("ANYCHIP_ASYNC_SAVE_KILLS", "50"))
ASYNC_PHASE_DELAY_S = 0.005  # a save then spans ~60 ms of phases, several saves per random sleep
ASYNC_KILL_AFTER_S = (0.0, 0.35)
SAVE_PHASES = ("fsync:", "rename:", "unlink:", "rmdir:")  # the labels install_hooks logs
# The label a save's thread logs last: fsync:root when it publishes without rotating, else
# rmdir:trash. A kill after one of these may have found the save finished, so it is not counted
# as a kill during a save; every other label after the last "started N" is one.
LAST_PHASES = ("fsync:root", "rmdir:trash")


def killed_mid_save(lines: list[str]) -> bool:
    """Whether the writer died with its last asynchronous save still writing."""
    starts = [i for i, line in enumerate(lines) if line.startswith("started ")]
    if not starts:
        return False
    phases = [line for line in lines[starts[-1] + 1:] if line.startswith(SAVE_PHASES)]
    return not phases or phases[-1] not in LAST_PHASES


def test_sigkill_during_asynchronous_save_never_loads_a_partial_checkpoint(tmp_path):
    import checkpoint_writer as cw

    ctx = multiprocessing.get_context("forkserver")  # as above: writers fork with torch imported
    ctx.set_forkserver_preload(PRELOAD)
    root, ref, rng = tmp_path / "ckpt", Reference(), random.Random(11)
    # Every update's digest as a writer logged it; update 0 is saved here, not by a writer.
    logged = {0: cw.state_digest(ref.step)}
    checkpoint.save(ref.step, root)
    floor, mid_save, last_lines = 0, 0, []
    for number in range(RANDOM_ASYNC_TRIALS):
        log = tmp_path / f"async-{number}.log"
        proc = ctx.Process(target=cw.write_forever, args=(str(root), str(log), None, ASYNC_PHASE_DELAY_S),
                           kwargs={"asynchronous": True}, daemon=True)
        proc.start()
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_text().startswith("ready")):
            assert time.monotonic() < deadline and proc.is_alive(), log.read_text() if log.exists() else "no log"
            time.sleep(0.005)
        time.sleep(rng.uniform(*ASYNC_KILL_AFTER_S))
        proc.kill()
        proc.join(30)
        lines = log.read_text().splitlines()
        assert proc.exitcode == -9, f"async trial {number}: writer ended with {proc.exitcode}: {lines[-3:]}"
        assert not any(line.startswith("error") for line in lines), f"async trial {number}: {lines}"
        for line in lines:
            if line.startswith("checksum "):
                _, n, digest = line.split()
                # Training resumed from a checkpoint is deterministic: an update logged again
                # by a later writer has the same state, else that checkpoint resumed wrongly.
                assert logged.setdefault(int(n), digest) == digest, f"async trial {number}: update {n} differs from before"
        mid_save += killed_mid_save(lines)
        last_lines.append(lines[-1])

        floor = check_after_crash(root, ref, floor)
        complete = checkpoint.checkpoints(root)
        for c in complete:
            n = step_of(c.name)
            assert n is not None and not c.name.startswith((".tmp-", ".trash-")), f"async trial {number}: {c.name} listed"
            assert n in logged, f"async trial {number}: {c.name} is of an update no writer logged"
            step = cw.make_step()
            checkpoint.load(root, step, at=n, restore_rng=False)
            assert cw.state_digest(step) == logged[n], (
                f"async trial {number}: {c.name} verifies but holds another state than update {n} had when its save began")
        assert complete[-1].name == dir_name(floor)
    assert len(set(logged.values())) == len(logged), "two updates logged the same state"
    # The kills are spread: many land while the background thread writes, not only between saves.
    assert mid_save >= RANDOM_ASYNC_TRIALS / 4, f"only {mid_save} of {RANDOM_ASYNC_TRIALS} kills hit a save: {last_lines}"
    assert len({p for p in last_lines if p.startswith(SAVE_PHASES)}) >= 3, last_lines

    clean_run_tidies_up(ctx, root, ref, floor, tmp_path / "async-final.log", asynchronous=True)
