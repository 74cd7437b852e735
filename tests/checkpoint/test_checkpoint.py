"""ac.save / ac.load: the on-disk layout, exact resumes, rotation, precision, and resuming a run
on another backend. Damage, crashes and pickles: tests/test_checkpoint_faults.py."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import struct

import numpy as np
import pytest
import torch

import anychip as ac
from anychip import checkpoint, workloads
from anychip.checkpoint import CheckpointExistsError, CheckpointMismatchError, CheckpointNotFoundError
from support import requires

pytestmark = requires("safetensors")
needs_jax = requires("jax", "torchax", "optax")


COSINE = ac.WarmupCosine(warmup=3, total=20)
ADAMW = ac.AdamW(lr=3e-3, weight_decay=0.1, schedule=COSINE)
SIZES = {"gpt-tiny": (4, 16), "mlp": (16, 1)}  # batch, seq


def make(name="gpt-tiny", spec=ADAMW, backend="cpu", precision="fp32", **kw):
    w = workloads.get(name)
    return ac.TrainStep(w.build(seed=1), w.loss_fn, spec, backend=backend, precision=precision, **kw)


def batch(name, i):
    b, s = SIZES[name]
    return workloads.get(name).batch(i, b, s, seed=0)


def header(path) -> dict:
    """A safetensors header, read by hand: {name: {"dtype", "shape", ...}}."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


@pytest.fixture
def keep_global_rng():
    """Tests that load with restore_rng=True change the global RNGs; put them back afterwards."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(saved[0]), np.random.set_state(saved[1]), random.setstate(saved[2])


# -- layout and manifest ---------------------------------------------------------------------------


def test_layout_and_manifest(tmp_path):
    step = make(max_grad_norm=1.0)
    for i in range(3):
        step(batch("gpt-tiny", i))
    out = checkpoint.save(step, tmp_path / "run", extra={"note": "hello", "epoch": 1})
    assert out == tmp_path / "run" / "step-000000003"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "step-000000003"]  # no temporary left
    # One process: one shard file holding every tensor whole, beside the manifest.
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rank-00000.safetensors"]

    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "anychip-checkpoint" and m["format_version"] == "2.0" and m["anychip_version"] == ac.__version__
    assert m["step"] == m["schedule_position"] == m["data_position"] == 3
    assert m["backend"] == "cpu" and m["precision"] == "fp32" and m["extra"] == {"note": "hello", "epoch": 1}
    assert m["optimizer"] == {
        "type": "AdamW",
        "fields": {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1,
                   "schedule": {"type": "WarmupCosine", "fields": {"warmup": 3, "total": 20, "min_ratio": 0.0}}},
    }
    assert set(m["rng"]) >= {"torch", "numpy", "python"}
    assert len(m["rng"]["numpy"]["keys"]) == 624 and len(m["rng"]["python"]["internal"]) == 625
    assert m["world_size"] == 1 and "rng_ranks" not in m
    (name, meta), = m["files"].items()
    data = (out / name).read_bytes()
    n_header = 8 + int.from_bytes(data[:8], "little")
    assert (meta["bytes"], meta["header_bytes"]) == (len(data), n_header)
    assert meta["header_sha256"] == hashlib.sha256(data[:n_header]).hexdigest()
    file_header = header(out / name)
    for key, chunk in meta["tensors"].items():  # each tensor's bytes hashed on their own
        begin, end = file_header[key]["data_offsets"]
        assert chunk["sha256"] == hashlib.sha256(data[n_header + begin:n_header + end]).hexdigest(), key
        assert chunk["offsets"] == [0] * len(chunk["shape"]) and chunk["shape"] == file_header[key]["shape"]
    # GPT-2 ties the LM head to the token embedding: stored once, the other name an alias.
    assert m["model"]["aliases"] == {"lm_head.weight": "wte.weight"}
    assert "model/lm_head.weight" not in file_header and file_header["model/wte.weight"]["shape"] == [256, 64]
    n_params = len(dict(step.model.named_parameters()))
    slots = [k.split("/")[1] for k in file_header if k.startswith("optimizer/")]
    assert sorted(set(slots)) == ["exp_avg", "exp_avg_sq"] and len(slots) == 2 * n_params
    # Where DCP's own safetensors reader finds the chunks (its sharding metadata), so it reads them too.
    sharding = json.loads(file_header["__metadata__"]["DCP_SHARDING_INFO"])
    assert set(sharding) == set(meta["tensors"]) and all(v["saved_offsets"] == meta["tensors"][k]["offsets"] for k, v in sharding.items())


def test_resume_on_same_backend_is_exact(tmp_path):
    a = make(max_grad_norm=1.0)
    for i in range(4):
        a(batch("gpt-tiny", i))
    checkpoint.save(a, tmp_path)
    b = make(max_grad_norm=1.0)
    info = checkpoint.load(tmp_path, b, restore_rng=False)
    assert (info.step, info.data_position, info.backend, b.step_count) == (4, 4, "cpu", 4)
    for i in range(4, 8):
        x, y = a(batch("gpt-tiny", i)), b(batch("gpt-tiny", i))
        assert (x.step, x.lr, x.loss, x.grad_norm) == (y.step, y.lr, y.loss, y.grad_norm)


def test_rng_states_are_restored(tmp_path, keep_global_rng):
    step = make("mlp")
    checkpoint.save(step, tmp_path)
    draw = lambda: (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])  # noqa: E731
    first = draw()
    checkpoint.load(tmp_path, make("mlp"))
    again = draw()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_load_does_not_touch_rng_when_asked(tmp_path):
    step = make("mlp")
    checkpoint.save(step, tmp_path)
    torch.rand(3)
    before = torch.get_rng_state()
    checkpoint.load(tmp_path, make("mlp"), restore_rng=False)
    assert torch.equal(torch.get_rng_state(), before)


# -- directory management --------------------------------------------------------------------------


def test_keep_last_keeps_the_newest_and_never_overwrites(tmp_path):
    step = make("mlp")
    for i in range(5):
        step(batch("mlp", i))
        checkpoint.save(step, tmp_path, keep_last=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-000000004", "step-000000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step-000000004", "step-000000005"]
    before = (tmp_path / "step-000000005" / "rank-00000.safetensors").read_bytes()
    step.load_state_dict(make("mlp").state_dict() | {"step": 5})  # different weights, same update
    with pytest.raises(CheckpointExistsError, match="never overwritten"):
        checkpoint.save(step, tmp_path, keep_last=1)
    assert (tmp_path / "step-000000005" / "rank-00000.safetensors").read_bytes() == before
    assert len(checkpoint.checkpoints(tmp_path)) == 2  # a refused save rotates nothing


def test_leftovers_are_ignored_then_cleaned(tmp_path, caplog):
    step = make("mlp")
    step(batch("mlp", 0))
    checkpoint.save(step, tmp_path)
    (tmp_path / ".tmp-step-000000002-123-abcd").mkdir()
    (tmp_path / ".tmp-step-000000002-123-abcd" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".trash-step-000000000-ffff").mkdir()
    (tmp_path / "step-000000009").mkdir()  # not written by a save: no manifest, so never "latest"
    assert checkpoint.load(tmp_path, make("mlp"), restore_rng=False).step == 1
    assert "step-000000009" in caplog.text
    step(batch("mlp", 1))
    checkpoint.save(step, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step-000000001", "step-000000002", "step-000000009"]


def test_load_a_given_update_or_directory(tmp_path):
    step = make("mlp")
    for i in range(3):
        step(batch("mlp", i))
        checkpoint.save(step, tmp_path)
    assert checkpoint.load(tmp_path, make("mlp"), at=2, restore_rng=False).step == 2
    assert checkpoint.load(tmp_path / "step-000000001", make("mlp"), restore_rng=False).step == 1
    assert checkpoint.load(tmp_path, make("mlp"), restore_rng=False).step == 3
    with pytest.raises(CheckpointNotFoundError, match=r"no complete checkpoint of update 7 .*complete ones: 1, 2, 3"):
        checkpoint.load(tmp_path, make("mlp"), at=7)


def test_nothing_to_load(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        checkpoint.load(tmp_path / "nope", make("mlp"))
    (tmp_path / ".tmp-step-000000001-1-aa").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="only unfinished saves"):
        checkpoint.load(tmp_path, make("mlp"))


@pytest.mark.parametrize("kw, error, message", [
    ({"keep_last": 0}, ValueError, "keep_last must be an int >= 1"),
    ({"keep_last": True}, ValueError, "keep_last must be an int >= 1"),
    ({"extra": {"f": object()}}, TypeError, "extra must be JSON-serialisable"),
])
def test_bad_arguments_write_nothing(tmp_path, kw, error, message):
    with pytest.raises(error, match=message):
        checkpoint.save(make("mlp"), tmp_path / "ckpt", **kw)
    assert not (tmp_path / "ckpt").exists()


# -- precision ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, stored", [("fp32", "F32"), ("bf16", "F32"), ("bf16-pure", "BF16")])
def test_parameters_keep_their_precision(tmp_path, precision, stored):
    """bf16 keeps float32 master weights (and float32 moments) on disk; bf16-pure stores bf16."""
    a = make(precision=precision)
    for i in range(2):
        a(batch("gpt-tiny", i))
    out = checkpoint.save(a, tmp_path)
    stored_header = header(out / "rank-00000.safetensors")
    for part in ("model/", "optimizer/"):
        dtypes = {v["dtype"] for k, v in stored_header.items() if k.startswith(part)}
        assert dtypes == {stored}, (part, dtypes)
    b = make(precision=precision)
    checkpoint.load(tmp_path, b, restore_rng=False)
    for i in range(2, 4):
        assert a(batch("gpt-tiny", i)).loss == b(batch("gpt-tiny", i)).loss


def test_parameter_dtype_change_is_refused(tmp_path):
    a = make(precision="bf16-pure")
    a(batch("gpt-tiny", 0))
    checkpoint.save(a, tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"dtype .*wte.weight bfloat16 vs float32.*precision 'bf16-pure'.*'fp32'") as info:
        checkpoint.load(tmp_path, make(precision="fp32"))
    assert ("wte.weight", "bfloat16", "float32") in info.value.retyped
    # fp32 -> bf16 keeps float32 master weights: same dtypes, so that move is allowed.
    b = make("mlp")
    b(batch("mlp", 0))
    checkpoint.save(b, tmp_path / "fp32")
    assert checkpoint.load(tmp_path / "fp32", make("mlp", precision="bf16"), restore_rng=False).precision == "fp32"


def user_adamw_step():
    w = workloads.get("mlp")
    model = w.build(seed=1)
    return ac.TrainStep(model, w.loss_fn, torch.optim.AdamW(model.parameters(), lr=1e-3), backend="cpu")


def conversion_warnings(caplog) -> list[str]:
    records = [r for r in caplog.records if r.name == "anychip" and r.levelno == logging.WARNING]
    return [r.getMessage() for r in records if "converted" in r.getMessage()]


def test_optimizer_state_cast_on_load_is_logged_once(tmp_path, caplog):
    """A torch.optim optimizer's state saved in bfloat16 (an optimizer that keeps bf16 moments)
    is cast to its float32 parameters' dtype on load, by torch: said once, with the counts."""
    a = user_adamw_step()
    a(batch("mlp", 0))
    for state in a.engine.optimizer.state.values():
        state["exp_avg"], state["exp_avg_sq"] = state["exp_avg"].bfloat16(), state["exp_avg_sq"].bfloat16()
    checkpoint.save(a, tmp_path)
    saved = a.state_dict()["optimizer"]["slots"]
    b = user_adamw_step()
    with caplog.at_level(logging.INFO, logger="anychip"):
        checkpoint.load(tmp_path, b, restore_rng=False)
    n = 2 * len(list(b.model.parameters()))  # exp_avg and exp_avg_sq; "step" is never cast
    where = tmp_path / "step-000000001"
    assert conversion_warnings(caplog) == [f"anychip: load: {n} tensors converted bfloat16 -> float32 (optimizer state {n}) from {where}"]
    got = b.state_dict()["optimizer"]["slots"]
    for slot in ("exp_avg", "exp_avg_sq"):
        for k, t in saved[slot].items():
            assert got[slot][k].dtype == torch.float32 and torch.equal(got[slot][k], t.float()), (slot, k)


@pytest.mark.parametrize("optimizer", ["spec", "torch.optim"])
def test_same_dtype_load_logs_no_conversion(tmp_path, caplog, optimizer):
    a = make("mlp") if optimizer == "spec" else user_adamw_step()
    a(batch("mlp", 0))
    checkpoint.save(a, tmp_path)
    with caplog.at_level(logging.INFO, logger="anychip"):
        checkpoint.load(tmp_path, make("mlp") if optimizer == "spec" else user_adamw_step(), restore_rng=False)
    assert any("loaded update 1" in r.getMessage() for r in caplog.records)  # the log was captured
    assert conversion_warnings(caplog) == []


def test_a_bf16_checkpoint_resumed_in_fp32_is_said_once(tmp_path, caplog):
    """bf16 autocast keeps float32 weights, so a bf16 run's checkpoint fits an fp32 step: it
    loads, equal, with one warning naming both precisions; an fp32 -> fp32 load has none."""
    a = make("mlp", precision="bf16")
    a(batch("mlp", 0))
    checkpoint.save(a, tmp_path / "bf16")
    b = make("mlp")
    with caplog.at_level(logging.INFO, logger="anychip"):
        checkpoint.load(tmp_path / "bf16", b, restore_rng=False)
    said = [r.getMessage() for r in caplog.records if "trained with precision" in r.getMessage()]
    assert len(said) == 1 and "'bf16'" in said[0] and "'fp32'" in said[0] and "float32" in said[0], said
    assert all(torch.equal(b.state_dict()["model"][k], v) for k, v in a.state_dict()["model"].items())
    caplog.clear()
    checkpoint.save(b, tmp_path / "fp32")
    with caplog.at_level(logging.INFO, logger="anychip"):
        checkpoint.load(tmp_path / "fp32", make("mlp"), restore_rng=False)
    assert not [r for r in caplog.records if "trained with precision" in r.getMessage()]


@needs_jax
def test_bf16_master_weights_stay_float32_on_jax(tmp_path):
    a = make("mlp", precision="bf16")
    for i in range(2):
        a(batch("mlp", i))
    checkpoint.save(a, tmp_path)
    j = make("mlp", backend="jax:cpu", precision="bf16")
    checkpoint.load(tmp_path, j, restore_rng=False)
    got, want = j.state_dict(), a.state_dict()
    for k, t in want["model"].items():
        assert got["model"][k].dtype == torch.float32 and torch.equal(got["model"][k], t), k
    for slot, by_name in want["optimizer"]["slots"].items():
        for k, t in by_name.items():
            assert got["optimizer"]["slots"][slot][k].dtype == torch.float32 and torch.equal(got["optimizer"]["slots"][slot][k], t)


# -- optimizer ---------------------------------------------------------------------------------------


def test_optimizer_mismatch_is_reported(tmp_path):
    a = make("mlp")
    a(batch("mlp", 0))
    checkpoint.save(a, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="optimizer type: checkpoint AdamW, step SGD"):
        checkpoint.load(tmp_path, make("mlp", spec=ac.SGD(lr=0.1, momentum=0.9)))
    changed = ac.AdamW(lr=1e-3, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=3, total=40))
    target = make("mlp", spec=changed)
    with pytest.raises(
        CheckpointMismatchError, match=r"lr: checkpoint 0.003, step 0.001; schedule.total: checkpoint 20, step 40.*allow_optimizer_change"
    ) as info:
        checkpoint.load(tmp_path, target)
    assert len(info.value.optimizer) == 2 and target.step_count == 0
    assert checkpoint.load(tmp_path, target, allow_optimizer_change=True, restore_rng=False).step == 1
    assert target(batch("mlp", 1)).lr == pytest.approx(changed.lr_at(1))


# -- resuming on another backend -----------------------------------------------------------------------

LINEAR = ac.WarmupLinear(warmup=3, total=20, min_ratio=0.1)
COMBOS = {
    # name: (workload, optimizer spec, max_grad_norm): every optimizer and every schedule
    "adamw-cosine": ("gpt-tiny", ADAMW, 1.0),
    "sgd-momentum-linear": ("mlp", ac.SGD(lr=5e-2, momentum=0.9, weight_decay=0.01, schedule=LINEAR), None),
    "sgd-nesterov-linear": ("mlp", ac.SGD(lr=5e-2, momentum=0.9, nesterov=True, schedule=LINEAR), 0.5),
    "adamw-constant": ("mlp", ac.AdamW(lr=3e-3, schedule=ac.Constant()), None),
    "sgd-constant": ("mlp", ac.SGD(lr=5e-2, schedule=ac.Constant()), None),
}
RTOL = 1e-5  # per step, as the JAX parity tests
SPLIT, TOTAL = 10, 20


def assert_losses_match(got, want, what):
    assert len(got) == len(want)
    for (g_step, g_lr, g), (w_step, w_lr, w) in zip(got, want):
        assert g_step == w_step and g_lr == pytest.approx(w_lr, rel=1e-12), what
        assert abs(g - w) <= RTOL * abs(w), f"{what}: step {g_step}: loss {g} vs uninterrupted {w}"


def record(step, name, first, last):
    return [(o.step, o.lr, o.loss) for o in (step(batch(name, i)) for i in range(first, last))]


@needs_jax
@pytest.mark.parametrize("combo", COMBOS)
def test_resume_on_the_other_backend_matches_uninterrupted_run(tmp_path, combo):
    """10 updates on one backend, save, 10 more on the other == 20 uninterrupted on cpu."""
    name, spec, clip = COMBOS[combo]
    reference = make(name, spec, max_grad_norm=clip)
    uninterrupted = record(reference, name, 0, SPLIT)
    checkpoint.save(reference, tmp_path / "from-cpu")
    uninterrupted += record(reference, name, SPLIT, TOTAL)

    jax_step = make(name, spec, backend="jax:cpu", max_grad_norm=clip)
    assert_losses_match(record(jax_step, name, 0, SPLIT), uninterrupted[:SPLIT], "jax:cpu from scratch")
    checkpoint.save(jax_step, tmp_path / "from-jax")

    # cpu -> jax:cpu (the same jax step, so its program is compiled once)
    info = checkpoint.load(tmp_path / "from-cpu", jax_step, restore_rng=False)
    assert (info.backend, info.step, jax_step.step_count) == ("cpu", SPLIT, SPLIT)
    assert_losses_match(record(jax_step, name, info.data_position, TOTAL), uninterrupted[SPLIT:], "cpu -> jax:cpu")

    # jax:cpu -> cpu
    cpu_step = make(name, spec, max_grad_norm=clip)
    info = checkpoint.load(tmp_path / "from-jax", cpu_step, restore_rng=False)
    assert (info.backend, info.step) == ("jax:cpu", SPLIT)
    assert_losses_match(record(cpu_step, name, info.data_position, TOTAL), uninterrupted[SPLIT:], "jax:cpu -> cpu")


@pytest.mark.parametrize("lose", ["optimizer state", "schedule position"])
def test_resume_check_has_teeth(lose):
    """Resuming without the optimizer state, or at the wrong schedule position, breaks RTOL:
    the cross-backend comparison above can fail."""
    name, spec, clip = COMBOS["sgd-momentum-linear"]
    reference = make(name, spec)
    record(reference, name, 0, SPLIT)
    state = reference.state_dict()
    uninterrupted = record(reference, name, SPLIT, TOTAL)
    if lose == "optimizer state":
        state["optimizer"]["slots"] = {s: {} for s in state["optimizer"]["slots"]}
    else:
        state["step"] = 0
    resumed = make(name, spec)
    resumed.load_state_dict(state)
    got = record(resumed, name, SPLIT, TOTAL)
    worst = max(abs(g[2] - w[2]) / abs(w[2]) for g, w in zip(got, uninterrupted))
    assert worst > 10 * RTOL, worst


def test_dcp_s_own_safetensors_reader_reads_the_shard_files(tmp_path):
    """The shard files are DCP's Hugging Face safetensors layout: plain torch.distributed.checkpoint
    loads them without anychip (the manifest is what anychip adds on top)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    step = make("mlp")
    step(batch("mlp", 0))
    saved = checkpoint.save(step, tmp_path)
    state = step.state_dict()
    want = {f"model/{k}": v for k, v in state["model"].items()}
    want |= {f"optimizer/{slot}/{k}": v for slot, by in state["optimizer"]["slots"].items() for k, v in by.items()}
    got = {k: torch.zeros_like(v) for k, v in want.items()}
    dcp.load(got, storage_reader=HuggingFaceStorageReader(str(saved)), no_dist=True)
    assert all(torch.equal(got[k], v) for k, v in want.items())
