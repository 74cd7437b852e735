"""The TrainStep contract, once, for every backend (see conftest.py for which ones run).

Each test builds the step through the public API only (``ac.TrainStep``, ``step.state_dict()``)
and compares it with the loop a user writes in plain PyTorch (plain_torch.py), or with the
same backend run another way (accumulation, resume). Weights are compared through
``state_dict()``: CPU tensors by name, whatever the backend keeps on its device.
"""

from __future__ import annotations

import copy
import logging
import math
import re

import pytest
import torch

import anychip as ac
import plain_torch
from anychip import workloads
from anychip.recompile import RecompileError, pad_to_bucket

SHAPES = {"mlp": (8, 1), "gpt-tiny": (4, 16)}  # (batch, seq): tiny, so compiling backends stay quick
OPTIMIZERS = {
    "adamw": lambda total: ac.AdamW(lr=3e-3, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=2, total=total)),
    "sgd": lambda total: ac.SGD(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01, schedule=ac.WarmupCosine(warmup=2, total=total)),
}


def data(name: str, n: int, start: int = 0, batch: int | None = None, seq: int | None = None) -> list:
    default_batch, default_seq = SHAPES[name]
    return [workloads.get(name).batch(start + i, batch or default_batch, seq or default_seq) for i in range(n)]


def poisoned(batch):
    """The batch with one NaN input: its loss and gradient are NaN on every backend."""
    x, y = batch
    x = x.clone()
    x[0, 0] = float("nan")
    return x, y


def weights(step) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in step.state_dict()["model"].items()}


def snapshot(step) -> tuple:
    sd = step.state_dict()
    slots = {s: {n: t.clone() for n, t in d.items()} for s, d in sd["optimizer"]["slots"].items()}
    return sd["step"], {k: v.clone() for k, v in sd["model"].items()}, slots


def assert_same_state(got: tuple, want: tuple) -> None:
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][k], want[1][k]) for k in want[1])
    assert got[2].keys() == want[2].keys()
    for slot in want[2]:
        assert all(torch.equal(got[2][slot][n], want[2][slot][n]) for n in want[2][slot]), slot


def assert_losses(got, want, tol, what="loss") -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want), start=1):
        assert math.isfinite(g) and tol.close(g, w), f"step {i}: {what} {g!r}, expected {w!r}"


def assert_weights(step, reference: torch.nn.Module, tol) -> None:
    got = weights(step)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=tol.weight_rtol, atol=tol.weight_atol, msg=lambda m: f"{name}: {m}")


NORM_RTOL = 1e-5  # the grad norm is one reduction whose order differs between implementations


# -- fp32: the same numbers as the plain PyTorch loop ----------------------------------------------


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(SHAPES))
def test_fp32_matches_the_hand_written_loop(backend, tol, name, optimizer):
    w = workloads.get(name)
    batches = data(name, 6)
    spec = OPTIMIZERS[optimizer](len(batches))
    model = w.build(seed=1)
    step = ac.TrainStep(copy.deepcopy(model), w.loss_fn, spec, backend=backend, max_grad_norm=0.5)
    outs = [step(b) for b in batches]
    ref = plain_torch.train(model, w.loss_fn, batches, spec, max_grad_norm=0.5)
    assert_losses([o.loss for o in outs], ref.losses, tol)
    assert [o.grad_norm for o in outs] == pytest.approx(ref.grad_norms, rel=NORM_RTOL)
    assert_weights(step, ref.model, tol)
    assert [o.step for o in outs] == list(range(1, 7)) and step.step_count == 6
    assert [o.lr for o in outs] == pytest.approx([spec.lr_at(s) for s in range(6)], rel=1e-12)
    tokens = batches[0][0].numel() if batches[0][0].dtype == torch.long else batches[0][0].shape[0]
    assert {o.tokens for o in outs} == {tokens}  # token ids count one each; otherwise one per sample


# -- accumulation: two micro-batches are one update on the whole batch ------------------------------


# (pack the workload's (inputs, labels), unpack it again in the loss function)
LAYOUTS = {
    "tensor": (lambda b: b, lambda b: b),
    "dict": (lambda b: {"inputs": b[0], "labels": b[1]}, lambda b: (b["inputs"], b["labels"])),
    "nested": (lambda b: [{"inputs": (b[0],)}, {"labels": b[1]}], lambda b: (b[0]["inputs"][0], b[1]["labels"])),
}


@pytest.mark.parametrize("name, layout", [("mlp", "tensor"), ("gpt-tiny", "tensor"), ("mlp", "dict"), ("mlp", "nested")])
def test_accumulate_two_equals_one_step_on_the_whole_batch(backend, name, layout):
    """Every micro-batch is its own chunk of every leaf: a mean loss over two equal halves is
    the loss of the whole batch, and so is the update."""
    w = workloads.get(name)
    pack, unpack = LAYOUTS[layout]
    loss_fn = w.loss_fn if layout == "tensor" else (lambda model, b: w.loss_fn(model, unpack(b)))
    batches = [pack(b) for b in data(name, 3, start=10)]
    model = w.build(seed=2)
    spec = ac.SGD(lr=0.1, momentum=0.9)
    whole = ac.TrainStep(copy.deepcopy(model), loss_fn, spec, backend=backend)
    split = ac.TrainStep(copy.deepcopy(model), loss_fn, spec, backend=backend, accumulate=2)
    for i, b in enumerate(batches, start=1):
        a, s = whole(b), split(b)
        assert s.step == a.step == i and s.tokens == a.tokens
        assert s.loss == pytest.approx(a.loss, rel=1e-6), f"step {i}: loss"
        assert s.grad_norm == pytest.approx(a.grad_norm, rel=1e-5), f"step {i}: grad norm"
    got, want = weights(split), weights(whole)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


# -- clipping: to max_grad_norm above it, untouched below it ------------------------------------------


def clip_threshold(case: str, norms: list[float]) -> float:
    return {"below": 2.0 * max(norms), "above": 0.5 * min(norms), "crossing": sorted(norms)[len(norms) // 2]}[case]


@pytest.mark.parametrize("case", ["below", "above", "crossing"])
def test_max_grad_norm_clips_like_clip_grad_norm(backend, tol, case):
    """Plain SGD, so an update is lr x the (clipped) gradient: a clip coefficient that is not
    clamped to 1 would scale small gradients up and fail "below" and "crossing"."""
    w = workloads.get("mlp")
    batches = data("mlp", 6, start=20, batch=32)
    spec = ac.SGD(lr=0.5)
    unclipped = plain_torch.train(w.build(seed=3), w.loss_fn, batches, spec)
    bound = clip_threshold(case, unclipped.grad_norms)
    ref = plain_torch.train(w.build(seed=3), w.loss_fn, batches, spec, max_grad_norm=bound)
    above = [n > bound for n in ref.grad_norms]
    assert {"below": not any(above), "above": all(above), "crossing": 0 < sum(above) < len(above)}[case], (bound, ref.grad_norms)

    step = ac.TrainStep(w.build(seed=3), w.loss_fn, spec, backend=backend, max_grad_norm=bound)
    before = weights(step)
    first = step(batches[0])
    assert first.grad_norm == pytest.approx(ref.grad_norms[0], rel=NORM_RTOL)  # reported before clipping
    moved = torch.linalg.vector_norm(torch.cat([(v - before[k]).flatten() for k, v in weights(step).items()]))
    assert moved.item() == pytest.approx(spec.lr * min(first.grad_norm, bound), rel=1e-4)
    outs = [first] + [step(b) for b in batches[1:]]
    assert_losses([o.loss for o in outs], ref.losses, tol)
    assert [o.grad_norm for o in outs] == pytest.approx(ref.grad_norms, rel=NORM_RTOL)
    assert_weights(step, ref.model, tol)


# -- non-finite updates: "raise", "skip", "ignore" -----------------------------------------------------


def test_nonfinite_raise_applies_nothing_and_training_goes_on(backend, tol):
    """A backend may read the finiteness flag one step late (no device sync per step): the error
    then comes with the next call, and the call queued behind the bad step changes nothing
    either. A bad last step surfaces in ``state_dict()``."""
    w = workloads.get("mlp")
    good = data("mlp", 4, start=30)
    spec = ac.AdamW(lr=1e-2, schedule=ac.WarmupLinear(warmup=2, total=8))  # moments and schedule must be restored
    model = w.build(seed=4)
    step = ac.TrainStep(copy.deepcopy(model), w.loss_fn, spec, backend=backend)
    for b in good[:2]:
        step(b)
    before = snapshot(step)
    with pytest.raises(ac.NonFiniteLossError, match=r"step 3: loss nan, grad norm nan is not finite; parameters were not updated"):
        step(poisoned(good[2]))
        step(good[2])
    assert step.step_count == 2
    assert_same_state(snapshot(step), before)
    outs = [step(b) for b in good[2:]]
    assert [o.step for o in outs] == [3, 4]
    ref = plain_torch.train(model, w.loss_fn, good, spec)
    assert_losses([o.loss for o in outs], ref.losses[2:], tol)
    assert_weights(step, ref.model, tol)
    with pytest.raises(ac.NonFiniteLossError, match="step 5: loss nan"):
        step(poisoned(good[0]))
        step.state_dict()
    assert step.state_dict()["step"] == 4 and step.step_count == 4


def test_nonfinite_skip_withholds_the_update_and_the_schedule(backend, tol):
    w = workloads.get("mlp")
    good = data("mlp", 3, start=40)
    sequence = [poisoned(good[0]), good[0], good[1], poisoned(good[2]), good[2]]  # the first step too
    spec = ac.AdamW(lr=1e-2, schedule=ac.WarmupLinear(warmup=2, total=8))
    model = w.build(seed=5)
    step = ac.TrainStep(copy.deepcopy(model), w.loss_fn, spec, backend=backend, on_nonfinite="skip")
    outs = []
    for b in sequence:
        before = snapshot(step)
        outs.append(step(b))
        if outs[-1].skipped:
            assert_same_state(snapshot(step), before)  # params, optimizer state and counter
    assert [o.skipped for o in outs] == [True, False, False, True, False]
    assert [o.step for o in outs] == [0, 1, 2, 2, 3] and step.step_count == 3
    kept = [o for o in outs if not o.skipped]
    assert [o.lr for o in kept] == pytest.approx([spec.lr_at(s) for s in range(3)], rel=1e-12)
    ref = plain_torch.train(model, w.loss_fn, good, spec)
    assert_losses([o.loss for o in kept], ref.losses, tol)
    assert_weights(step, ref.model, tol)


def test_nonfinite_ignore_applies_the_update(backend):
    w = workloads.get("mlp")
    step = ac.TrainStep(w.build(seed=6), w.loss_fn, ac.SGD(lr=1e-2), backend=backend, on_nonfinite="ignore")
    out = step(poisoned(data("mlp", 1, start=50)[0]))
    assert not out.skipped and out.step == 1 and step.step_count == 1 and math.isnan(out.loss)
    assert any(torch.isnan(v).any() for v in weights(step).values())


# -- state_dict: save, load into a fresh step, continue ----------------------------------------------


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_state_dict_round_trip_resumes_exactly(backend, tol, optimizer):
    w = workloads.get("gpt-tiny")
    batches = data("gpt-tiny", 6, start=60)
    spec = OPTIMIZERS[optimizer](len(batches))
    straight = ac.TrainStep(w.build(seed=7), w.loss_fn, spec, backend=backend, max_grad_norm=0.5)
    expected = [straight(b).loss for b in batches]

    first = ac.TrainStep(w.build(seed=7), w.loss_fn, spec, backend=backend, max_grad_norm=0.5)
    got = [first(b).loss for b in batches[:3]]
    state = copy.deepcopy(first.state_dict())
    assert state["step"] == 3
    assert all(t.device.type == "cpu" for t in state["model"].values())
    assert set(state["optimizer"]["slots"]) == set(spec.slots)
    assert all(t.device.type == "cpu" for s in state["optimizer"]["slots"].values() for t in s.values())
    resumed = ac.TrainStep(w.build(seed=99), w.loss_fn, spec, backend=backend, max_grad_norm=0.5)  # all from the state
    resumed.load_state_dict(state)
    assert resumed.step_count == 3
    tail = [resumed(b) for b in batches[3:]]
    assert [o.step for o in tail] == [4, 5, 6]
    assert [o.lr for o in tail] == pytest.approx([spec.lr_at(s) for s in (3, 4, 5)], rel=1e-12)
    assert_losses(got + [o.loss for o in tail], expected, tol)
    end, want = weights(resumed), weights(straight)
    for k in want:
        torch.testing.assert_close(end[k], want[k], rtol=tol.weight_rtol, atol=tol.weight_atol, msg=lambda m: f"{k}: {m}")


# -- recompiles: a new input signature warns once, strict_shapes refuses it ---------------------------


def recompile_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "recompiling" in r.getMessage()]


def test_new_shape_warns_once_and_seen_shapes_do_not(backend, caplog):
    w = workloads.get("gpt-tiny")
    step = ac.TrainStep(w.build(seed=8), w.loss_fn, ac.AdamW(lr=1e-3), backend=backend)
    with caplog.at_level(logging.WARNING, logger="anychip"):
        for i, seq in enumerate((16, 16, 8, 8, 16)):
            assert math.isfinite(step(data("gpt-tiny", 1, start=70 + i, seq=seq)[0]).loss)
    changes = "batch[0] shape (4, 16) -> (4, 8); batch[1] shape (4, 16) -> (4, 8)"
    assert recompile_warnings(caplog) == [f"anychip: recompiling the step on {backend!r}: {changes}"]
    assert step.step_count == 5


def test_strict_shapes_refuses_a_new_shape_before_any_work(backend):
    w = workloads.get("gpt-tiny")
    step = ac.TrainStep(w.build(seed=8), w.loss_fn, ac.AdamW(lr=1e-3), backend=backend, strict_shapes=True)
    step(data("gpt-tiny", 1, start=80)[0])
    before = snapshot(step)
    refused = rf"batch\[0\] shape \(4, 16\) -> \(4, 8\).*{re.escape(repr(backend))}.*strict_shapes=True.*pad_to_bucket"
    with pytest.raises(RecompileError, match=refused):
        step(data("gpt-tiny", 1, start=81, seq=8)[0])
    assert step.step_count == 1
    assert_same_state(snapshot(step), before)
    assert math.isfinite(step(data("gpt-tiny", 1, start=82)[0]).loss)  # the known shape still runs


def test_pad_to_bucket_keeps_one_signature(backend, caplog):
    w = workloads.get("gpt-tiny")
    step = ac.TrainStep(w.build(seed=8), w.loss_fn, ac.AdamW(lr=1e-3), backend=backend, strict_shapes=True)
    with caplog.at_level(logging.WARNING, logger="anychip"):
        for i, seq in enumerate((16, 10, 13, 7)):
            x, y = pad_to_bucket(data("gpt-tiny", 1, start=90 + i, seq=seq)[0], buckets=(16,))
            assert x.shape == y.shape == (4, 16) and (y[:, seq:] == -100).all()
            assert math.isfinite(step((x, y)).loss)
    assert recompile_warnings(caplog) == [] and step.step_count == 4
