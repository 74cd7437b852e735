"""The user's own ``torch.optim`` optimizer and LR scheduler on `neuron-xla`, passed unchanged:
torch_xla's ``.to()`` makes new Parameter objects, so the step rebinds the optimizer's groups to
them; every scheduled value (lr, OneCycleLR's momentum) is a Python scalar torch_xla passes as
device data, so a new value compiles no new graph. The reference is the hand-written loop on the
CPU in this process (tests/test_user_optimizer.py has the same cases on cpu and jax:cpu).
"""

from __future__ import annotations

import math

import pytest
import torch

import anychip as ac
from optimizer_cases import RECIPES as ALL_RECIPES
from optimizer_cases import adamw_warmup, batches, build, loss_fn, plain_loop, sgd_onecycle

STEPS = 6  # of the recipes' 8 (their schedules are built for 8)


RECIPES = {name: ALL_RECIPES[name] for name in ("adamw-groups-lambdalr", "sgd-nesterov-onecycle")}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_torch_optimizer_and_scheduler_unchanged_equal_the_plain_loop_without_new_graphs(recipe):
    data = batches(STEPS)
    want, want_lrs, momenta, ref = plain_loop(RECIPES[recipe], data)
    be = ac.backend("neuron-xla")
    model = build()
    opt, sched = RECIPES[recipe](model)
    step = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend="neuron-xla")
    start = be.graph_stats()["compiles"]
    outs, compiles, seen_momenta = [], [], []
    for b in data:
        seen_momenta.append(opt.param_groups[0].get("momentum"))
        outs.append(step(b))
        outs[-1].loss  # noqa: B018  (read after the step's sync)
        compiles.append(be.graph_stats()["compiles"] - start)
    for i, (o, w) in enumerate(zip(outs, want), start=1):
        assert math.isfinite(o.loss) and abs(o.loss - w) <= 1e-5 * abs(w), f"step {i}: {o.loss!r} vs {w!r}"
    assert [o.lrs for o in outs] == want_lrs
    assert seen_momenta == momenta and (recipe != "sgd-nesterov-onecycle" or len(set(momenta)) >= 4)  # it really moved
    # the optimizer now holds the parameters on the device, the same objects the model trains
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in step.model.parameters()}
    for (name, p), q in zip(step.model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-5), name
    # Step 1 has its own graph (the optimizer creates its state there); every later step, with
    # its new lr (and momentum), reuses one graph.
    assert compiles[-1] == compiles[1] <= 2, compiles


def test_save_on_neuron_xla_resume_on_cpu(tmp_path):
    data = batches(STEPS)
    want, want_lrs, _, _ = plain_loop(sgd_onecycle, data)
    model = build()
    opt, sched = sgd_onecycle(model)
    a = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend="neuron-xla")
    for b in data[:3]:
        a(b)
    ac.save(a, tmp_path)
    model = build()
    opt, sched = sgd_onecycle(model)
    b = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend="cpu")
    ac.load(tmp_path, b)
    outs = [b(x) for x in data[3:]]
    assert [o.loss for o in outs] == pytest.approx(want[3:], rel=1e-5)
    assert [o.lrs for o in outs] == want_lrs[3:]


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_withheld_update_does_not_advance_the_scheduler(policy):
    """The update is masked on the device; "raise" learns it one step late and puts the
    scheduler back, "skip" never steps it."""
    model = build()
    opt, sched = adamw_warmup(model)
    step = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend="neuron-xla", on_nonfinite=policy)
    data = batches(3)
    step(data[0]).loss  # noqa: B018
    bad = (torch.full_like(data[1][0], float("nan")), data[1][1])
    if policy == "raise":
        with pytest.raises(ac.NonFiniteLossError, match="step 2"):
            step(bad)
            step(data[2])
    else:
        assert step(bad).skipped
    assert step.step_count == 1 and sched.last_epoch == 1
    assert [g["lr"] for g in opt.param_groups] == [2e-2 * ((1 + 1) / 3)] * 2
