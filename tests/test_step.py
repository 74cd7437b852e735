"""TrainStep on the cpu backend against plain PyTorch: the reference is a hand-written loop."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

import anychip as ac
from anychip import workloads
from anychip.recompile import RecompileError, pad_to_bucket
from support import hand_written_loop, requires


def batches(workload, n, batch=8, seq=16, seed=0, start=0):
    return [workload.batch(start + i, batch, seq, seed) for i in range(n)]


@pytest.mark.parametrize("name", ["mlp", "gpt-tiny"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_same_losses_as_hand_written_loop(name, optimizer):
    w = workloads.get(name)
    data = batches(w, 8)
    schedule = ac.WarmupCosine(warmup=2, total=8)
    if optimizer == "adamw":
        spec, sgd = ac.AdamW(lr=3e-3, weight_decay=0.1, schedule=schedule), None
    else:
        spec, sgd = ac.SGD(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01, schedule=schedule), {"momentum": 0.9, "nesterov": True}
    ref_model = w.build(seed=1)
    ours = ac.TrainStep(copy.deepcopy(ref_model), w.loss_fn, spec, backend="cpu", max_grad_norm=0.5)
    expected = hand_written_loop(ref_model, w.loss_fn, data, lr=spec.lr, weight_decay=spec.weight_decay, schedule=schedule, max_grad_norm=0.5, sgd=sgd)
    got = [ours(b).loss for b in data]
    # Same operations in the same order on the same device: bit-identical.
    assert got == expected
    for (n1, p1), (n2, p2) in zip(ours.model.named_parameters(), ref_model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("name", ["mlp", "gpt-tiny", "llama-tiny"])
def test_loss_falls(name):
    w = workloads.get(name)
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=3e-3), backend="cpu")
    losses = [step(b).loss for b in batches(w, 40, batch=16, seq=32)]
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("name", ["mlp", "gpt-tiny"])
def test_accumulate_equals_one_step_on_the_whole_batch(name):
    w = workloads.get(name)
    model = w.build(seed=2)
    whole = ac.TrainStep(copy.deepcopy(model), w.loss_fn, ac.SGD(lr=0.1), backend="cpu")
    split = ac.TrainStep(copy.deepcopy(model), w.loss_fn, ac.SGD(lr=0.1), backend="cpu", accumulate=4)
    for b in batches(w, 3, batch=16):
        out_whole, out_split = whole(b), split(b)
        torch.testing.assert_close(torch.tensor(out_split.loss), torch.tensor(out_whole.loss), rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.tensor(out_split.grad_norm), torch.tensor(out_whole.grad_norm), rtol=1e-5, atol=0)
    for p1, p2 in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-7)


def test_max_grad_norm_clips_to_the_bound():
    w = workloads.get("mlp")
    model = w.build(seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    step = ac.TrainStep(model, w.loss_fn, ac.SGD(lr=1.0), backend="cpu", max_grad_norm=1e-3)
    (x, y) = w.batch(0, 32)
    # reference gradient norm, by hand
    ref = w.build(seed=3)
    w.loss_fn(ref, (x, y)).backward()
    ref_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ref.parameters()]))
    out = step((x, y))
    assert out.grad_norm == pytest.approx(ref_norm.item(), rel=1e-6)
    assert out.grad_norm > 1e-2  # so the bound is really active
    update = torch.linalg.vector_norm(torch.cat([(p.detach() - b).flatten() for p, b in zip(step.model.parameters(), before)]))
    assert update.item() == pytest.approx(1e-3, rel=1e-4)


def test_lr_in_output_follows_schedule():
    w = workloads.get("mlp")
    spec = ac.AdamW(lr=1e-2, schedule=ac.WarmupLinear(warmup=3, total=6))
    step = ac.TrainStep(w.build(), w.loss_fn, spec, backend="cpu")
    lrs = [step(b).lr for b in batches(w, 7)]
    assert lrs == pytest.approx([spec.lr_at(s) for s in range(7)])


@pytest.mark.parametrize("spec", [ac.AdamW(lr=1e-2, schedule=ac.WarmupCosine(2, 20)), ac.SGD(lr=0.05, momentum=0.9)], ids=["adamw", "sgd"])
def test_state_dict_round_trip_resumes_exactly(spec):
    w = workloads.get("gpt-tiny")
    data = batches(w, 10)
    straight = ac.TrainStep(w.build(seed=4), w.loss_fn, spec, backend="cpu")
    expected = [straight(b).loss for b in data]
    first = ac.TrainStep(w.build(seed=4), w.loss_fn, spec, backend="cpu")
    got = [first(b).loss for b in data[:5]]
    state = first.state_dict()
    assert all(t.device.type == "cpu" for t in state["model"].values())
    assert set(state["optimizer"]["slots"]) == set(spec.slots)
    resumed = ac.TrainStep(w.build(seed=99), w.loss_fn, spec, backend="cpu")
    resumed.load_state_dict(state)
    assert resumed.step_count == 5
    got += [resumed(b).loss for b in data[5:]]
    assert got == expected


def test_loss_is_read_lazily():
    w = workloads.get("mlp")
    out = ac.TrainStep(w.build(), w.loss_fn, backend="cpu")(w.batch(0, 8))
    assert isinstance(out.loss_tensor, torch.Tensor)
    assert isinstance(out.loss, float) and out.loss == out.loss_tensor.item()
    assert out.step == 1 and out.tokens == 8


def test_tokens_count_token_ids():
    w = workloads.get("gpt-tiny")
    out = ac.TrainStep(w.build(), w.loss_fn, backend="cpu")(w.batch(0, 4, 16))
    assert out.tokens == 4 * 16


def test_dict_batches_work():
    w = workloads.get("mlp")

    def loss_fn(model, batch):
        return w.loss_fn(model, (batch["x"], batch["y"]))

    x, y = w.batch(0, 8)
    assert ac.TrainStep(w.build(), loss_fn, backend="cpu", accumulate=2)({"x": x, "y": y}).loss > 0


def test_bf16_keeps_fp32_master_weights_and_tracks_fp32_loss():
    w = workloads.get("gpt-tiny")
    data = batches(w, 3)
    fp32 = ac.TrainStep(w.build(seed=5), w.loss_fn, backend="cpu")
    bf16 = ac.TrainStep(w.build(seed=5), w.loss_fn, backend="cpu", precision="bf16")
    for b in data:
        assert bf16(b).loss == pytest.approx(fp32(b).loss, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


def test_bf16_pure_stores_bf16():
    w = workloads.get("gpt-tiny")
    step = ac.TrainStep(w.build(), w.loss_fn, backend="cpu", precision="bf16-pure")
    out = step(w.batch(0, 4, 16))
    assert all(p.dtype == torch.bfloat16 for p in step.model.parameters())
    assert np.isfinite(out.loss)


# -- recompilation ---------------------------------------------------------------------------------------


def test_shape_change_warns_and_strict_raises(caplog):
    w = workloads.get("gpt-tiny")
    step = ac.TrainStep(w.build(), w.loss_fn, backend="cpu")
    step(w.batch(0, 4, 32))
    with caplog.at_level(logging.WARNING, logger="anychip"):
        step(w.batch(1, 4, 16))
    assert "recompiling the step on 'cpu': batch[0] shape (4, 32) -> (4, 16)" in caplog.text
    strict = ac.TrainStep(w.build(), w.loss_fn, backend="cpu", strict_shapes=True)
    strict(w.batch(0, 4, 32))
    with pytest.raises(RecompileError, match=r"batch\[0\] shape \(4, 32\) -> \(4, 16\).*pad_to_bucket"):
        strict(w.batch(1, 4, 16))
    assert strict.step_count == 1


def test_pad_to_bucket_keeps_one_signature_and_the_loss():
    w = workloads.get("gpt-tiny")
    step = ac.TrainStep(w.build(), w.loss_fn, backend="cpu", strict_shapes=True)
    for seq in (20, 27, 32):
        x, y = pad_to_bucket(w.batch(seq, 4, seq), buckets=(32, 64))
        assert x.shape == y.shape == (4, 32)
        assert (y[:, seq:] == -100).all()
        step((x, y))
    # padding targets with ignore_index leaves the loss of the real tokens unchanged
    model = w.build()
    b = w.batch(0, 2, 20)
    torch.testing.assert_close(w.loss_fn(model, pad_to_bucket(b, buckets=(32,))), w.loss_fn(model, b), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="largest bucket"):
        pad_to_bucket(w.batch(0, 2, 40), buckets=(32,))


@requires("c-compiler")
def test_compiled_step_matches_eager():
    """In a fresh process: torchax (the JAX tests) claims torch's PrivateUse1 device for "jax"
    in this one, and inductor then refuses to compile anything here."""
    code = """
import anychip as ac
from anychip import workloads
w = workloads.get("mlp")  # the mlp keeps inductor's CPU code generation short
data = [w.batch(i, 16) for i in range(3)]
eager = ac.TrainStep(w.build(seed=6), w.loss_fn, backend="cpu", compile=False)
compiled = ac.TrainStep(w.build(seed=6), w.loss_fn, backend="cpu", compile=True)
for b in data:
    e, c = eager(b).loss, compiled(b).loss
    assert abs(c - e) <= 1e-5 * abs(e), (c, e)
print("ok")
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# -- bad input: one clear error, before any work ---------------------------------------------------------


def _mlp_step(**kw):
    w = workloads.get("mlp")
    return w, ac.TrainStep(w.build(), w.loss_fn, backend="cpu", **kw)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"precision": "bf61"}, ValueError, "unknown precision 'bf61'. Did you mean 'bf16'"),
        ({"backend": "tpu"}, ac.UnknownBackendError, "unknown backend 'tpu'"),
        ({"accumulate": 0}, ValueError, "accumulate must be an int >= 1"),
        ({"max_grad_norm": -1}, ValueError, "max_grad_norm"),
        ({"on_nonfinite": "warn"}, ValueError, "on_nonfinite"),
        ({"parallel": "tp"}, ValueError, "parallel"),
        ({"kernels": "fast"}, ValueError, "kernels"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    w = workloads.get("mlp")
    kwargs.setdefault("backend", "cpu")
    with pytest.raises(error, match=match):
        ac.TrainStep(w.build(), w.loss_fn, **kwargs)


def test_torch_optimizer_instance_is_rejected_with_the_fix():
    w = workloads.get("mlp")
    model = w.build()
    with pytest.raises(TypeError, match=r"ac.AdamW"):
        ac.TrainStep(model, w.loss_fn, torch.optim.AdamW(model.parameters()), backend="cpu")


def test_model_and_loss_fn_types():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ac.TrainStep(lambda x: x, lambda m, b: 0, backend="cpu")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        ac.TrainStep(torch.nn.Linear(2, 2), "mse", backend="cpu")
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ac.TrainStep(frozen, lambda m, b: m(b).sum(), backend="cpu")


def test_non_scalar_loss():
    w = workloads.get("mlp")
    step = ac.TrainStep(w.build(), lambda m, b: m(b[0]), backend="cpu")
    with pytest.raises(ac.LossFunctionError, match=r"scalar tensor \(shape \(\)\), got shape \(8, 10\)"):
        step(w.batch(0, 8))
    step = ac.TrainStep(w.build(), lambda m, b: 1.0, backend="cpu")
    with pytest.raises(ac.LossFunctionError, match="got float"):
        step(w.batch(0, 8))


def test_loss_fn_raising_is_reported_in_one_line():
    def broken(model, batch):
        raise KeyError("labels")

    w = workloads.get("mlp")
    step = ac.TrainStep(w.build(), broken, backend="cpu")
    with pytest.raises(ac.LossFunctionError, match=r"loss_fn 'broken' raised KeyError: 'labels'") as err:
        step(w.batch(0, 8))
    assert isinstance(err.value.__cause__, KeyError)


@pytest.mark.parametrize(
    "batch, match",
    [
        (np.zeros((4, 32), dtype=np.float32), "numpy.ndarray.*torch.from_numpy"),
        ("some text", "batch is a builtins.str"),
        ((torch.zeros(4, 32), [1, 2]), r"batch\[1\]\[0\] is a builtins.int"),
        ((), "holds no tensor"),
    ],
)
def test_batch_of_the_wrong_type(batch, match):
    w, step = _mlp_step()
    with pytest.raises(TypeError, match=match):
        step(batch)
    assert step.step_count == 0


def test_batch_not_divisible_by_accumulate():
    w, step = _mlp_step(accumulate=3)
    with pytest.raises(ValueError, match="accumulate=3 cannot split"):
        step(w.batch(0, 8))


def _nan_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y) * torch.tensor(float("nan"))


def test_nan_loss_raises_and_leaves_parameters():
    w = workloads.get("mlp")
    model = w.build()
    before = copy.deepcopy(model.state_dict())
    step = ac.TrainStep(model, _nan_loss, backend="cpu")
    with pytest.raises(ac.NonFiniteLossError, match="step 1: loss nan.*not updated.*on_nonfinite='skip'"):
        step(w.batch(0, 8))
    for k, v in step.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_nan_loss_skip_keeps_training():
    w = workloads.get("mlp")
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss = w.loss_fn(model, batch)
        return loss * float("nan") if calls["n"] == 2 else loss

    step = ac.TrainStep(w.build(), sometimes_nan, backend="cpu", on_nonfinite="skip")
    outs = [step(b) for b in batches(w, 4)]
    assert [o.skipped for o in outs] == [False, True, False, False]
    assert [o.step for o in outs] == [1, 1, 2, 3]
    assert all(np.isfinite(p.detach().numpy()).all() for p in step.model.parameters())


def test_deferred_nonfinite_check_with_a_fused_optimizer():
    """Fused optimizers skip a non-finite update on the device (found_inf) without a sync; the
    error comes with the next call and names the bad step; parameters stay as after step 1."""
    from anychip.backends.cpu import CpuBackend, probe

    class FusedCpu(CpuBackend):
        fused_optimizer = True  # fused AdamW has CPU kernels too: the same code path as on CUDA

    w = workloads.get("mlp")
    calls = {"n": 0}

    def nan_at_2(model, batch):
        calls["n"] += 1
        loss = w.loss_fn(model, batch)
        return loss * float("nan") if calls["n"] == 2 else loss

    spec = ac.AdamW(lr=1e-2, schedule=ac.WarmupLinear(2, 10))
    step = ac.TrainStep(w.build(), nan_at_2, spec, backend=FusedCpu(probe()))
    assert step.engine.optimizer.defaults["fused"]
    step(w.batch(0, 8))
    after_first = copy.deepcopy(step.model.state_dict())
    step(w.batch(1, 8))  # the NaN step: no sync, no error yet
    with pytest.raises(ac.NonFiniteLossError, match="step 2: loss nan"):
        step(w.batch(2, 8))
    for k, v in step.model.state_dict().items():
        assert torch.equal(v, after_first[k]), k
    assert step.step_count == 1
    assert step.engine.optimizer.param_groups[0]["lr"] == pytest.approx(spec.lr_at(1))
    assert int(step.engine.optimizer.state[step.engine.params[0]]["step"]) == 1
    assert step(w.batch(3, 8)).step == 2  # training goes on from the last good state


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_parallel_outside_torchrun_names_the_launch_command(monkeypatch, mode):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    w = workloads.get("mlp")
    model = w.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ac.DistributedError, match=rf"parallel='{mode}' needs one process per device started by torchrun.*launch with: torchrun --nproc-per-node=N "):
        ac.TrainStep(model, w.loss_fn, backend="cpu", parallel=mode)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any work
