"""TrainStep on the cpu backend: what only the torch engine on the CPU does (bf16 autocast on the
CPU, torch.compile, fused optimizers, argument checks). The semantics every backend shares
(parity with a hand-written loop, accumulation, clipping, non-finite policies, state_dict,
recompiles) are tests/conformance, which runs on cpu too."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import anychip as ac
from anychip import workloads
from anychip.recompile import pad_to_bucket
from support import requires


def batches(workload, n, batch=8, seq=16, seed=0, start=0):
    return [workload.batch(start + i, batch, seq, seed) for i in range(n)]


@pytest.mark.parametrize("name", ["mlp", "gpt-tiny", "llama-tiny"])
def test_loss_falls(name):
    w = workloads.get(name)
    step = ac.TrainStep(w.build(seed=0), w.loss_fn, ac.AdamW(lr=3e-3), backend="cpu")
    losses = [step(b).loss for b in batches(w, 40, batch=16, seq=32)]
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:3]), losses


def test_loss_is_read_lazily():
    w = workloads.get("mlp")
    out = ac.TrainStep(w.build(), w.loss_fn, backend="cpu")(w.batch(0, 8))
    assert isinstance(out.loss_tensor, torch.Tensor)
    assert isinstance(out.loss, float) and out.loss == out.loss_tensor.item()
    assert out.step == 1 and out.tokens == 8


def test_bf16_keeps_fp32_master_weights_and_tracks_fp32_loss():
    w = workloads.get("gpt-tiny")
    data = batches(w, 3)
    fp32 = ac.TrainStep(w.build(seed=5), w.loss_fn, backend="cpu")
    bf16 = ac.TrainStep(w.build(seed=5), w.loss_fn, backend="cpu", precision="bf16")
    for b in data:
        assert bf16(b).loss == pytest.approx(fp32(b).loss, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())


def linear_output_dtypes(model: torch.nn.Module) -> dict[str, set]:
    """{name: dtypes seen} of every nn.Linear's output, filled in as the model runs."""
    seen: dict[str, set] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, set()).add(out.dtype))
    return seen


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_bf16_computes_the_matmuls_in_bf16(precision, dtype):
    """A loss close to fp32's does not show that bf16 ran: the matmuls' outputs do."""
    w = workloads.get("gpt-tiny")
    model = w.build(seed=5)
    seen = linear_output_dtypes(model)
    ac.TrainStep(model, w.loss_fn, backend="cpu", precision=precision)(w.batch(0, 4, 16))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and seen == {n: {dtype} for n in linears}


def test_bf16_pure_stores_bf16():
    w = workloads.get("gpt-tiny")
    step = ac.TrainStep(w.build(), w.loss_fn, backend="cpu", precision="bf16-pure")
    out = step(w.batch(0, 4, 16))
    assert all(p.dtype == torch.bfloat16 for p in step.model.parameters())
    assert np.isfinite(out.loss)


# -- pad_to_bucket -----------------------------------------------------------------------------------------


def test_pad_to_bucket_leaves_the_loss_of_the_real_tokens_unchanged():
    """Padding targets with ignore_index; that a padded batch keeps one signature on every
    backend is tests/conformance (test_pad_to_bucket_keeps_one_signature)."""
    w = workloads.get("gpt-tiny")
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
        ({"backend": "xpu"}, ac.UnknownBackendError, "unknown backend 'xpu'"),
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


def test_torch_optimizer_over_another_model_is_rejected_with_the_fix():
    # A torch.optim optimizer is accepted (tests/test_user_optimizer.py) over this model's parameters only.
    w = workloads.get("mlp")
    with pytest.raises(ValueError, match=r"is not a parameter of model; build the optimizer over the model"):
        ac.TrainStep(w.build(), w.loss_fn, torch.optim.AdamW(w.build().parameters()), backend="cpu")
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim optimizer .* or a spec such as ac.AdamW"):
        ac.TrainStep(w.build(), w.loss_fn, "adamw", backend="cpu")


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


def test_deferred_nonfinite_check_with_a_fused_optimizer():
    """Fused optimizers skip a non-finite update on the device (found_inf) without a sync; the
    error comes with the next call and names the bad step; parameters stay as after step 1."""
    from anychip.backends.torch.cpu import CpuBackend, probe

    class FusedCpu(CpuBackend):
        # fused AdamW has CPU kernels too: the same code path as on CUDA
        traits = dataclasses.replace(CpuBackend.traits, fused_optimizer=True)

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
    refused = rf"parallel='{mode}' needs one process per device started by torchrun.*launch with: torchrun --nproc-per-node=N "
    with pytest.raises(ac.DistributedError, match=refused):
        ac.TrainStep(model, w.loss_fn, backend="cpu", parallel=mode)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any work
