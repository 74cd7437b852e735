"""The user's own ``torch.optim`` optimizer and LR scheduler, passed to TrainStep unchanged, against
the same objects stepped by a hand-written torch loop: cpu (bit-equal: the same objects do the
same math) and jax:cpu (translated; every scheduled value is an input of one compiled step).
Checkpoints of them move between the two backends. The neuron-xla side is in
tests/xla/test_xla_user_optimizer.py; DDP/FSDP in tests/test_torchrun.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import anychip as ac
from anychip import step as step_module
from optimizer_cases import RECIPES, adamw_warmup, batches, build, loss_fn, no_decay, plain_loop
from support import requires

NEEDS_JAX = requires("jax", "torchax", "optax")
JAX = pytest.param("jax:cpu", marks=NEEDS_JAX)
BACKENDS = ["cpu", JAX]


def tolerance(backend: str) -> float:
    return 0.0 if backend == "cpu" else 1e-5  # cpu: the very objects, the same math


def assert_close(got, want, rtol, what=""):
    for i, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert math.isfinite(g) and abs(g - w) <= rtol * abs(w), f"{what} step {i}: {g!r} vs {w!r}"


def assert_weights(model, ref, rtol):
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        p = p.detach().cpu()
        assert torch.allclose(p, q.detach(), rtol=rtol, atol=rtol), f"{name}: max diff {(p - q).abs().max().item():.3g}"


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_optimizer_and_scheduler_unchanged_equal_the_plain_loop(backend, recipe):
    data = batches()
    want, want_lrs, _, ref = plain_loop(RECIPES[recipe], data)
    model = build()
    opt, sched = RECIPES[recipe](model)
    step = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend=backend)
    outs = [step(b) for b in data]
    assert_close([o.loss for o in outs], want, tolerance(backend), recipe)
    assert [o.lrs for o in outs] == want_lrs  # host floats from the user's own scheduler
    assert [o.lr for o in outs] == [lrs[0] for lrs in want_lrs]
    assert_weights(step.model, ref, max(tolerance(backend), 1e-5 if backend != "cpu" else 0.0))
    if backend.startswith("jax"):
        assert step.engine.compiles == 1  # every lr / momentum was an input of the one program


@pytest.mark.parametrize("first, second", [pytest.param("cpu", "jax:cpu", marks=NEEDS_JAX, id="cpu-to-jax"),
                                           pytest.param("jax:cpu", "cpu", marks=NEEDS_JAX, id="jax-to-cpu")])
@pytest.mark.parametrize("recipe", ["adamw-groups-lambdalr", "sgd-nesterov-onecycle"])
def test_save_at_step_4_resume_on_the_other_backend(tmp_path, recipe, first, second):
    data = batches()
    want, want_lrs, _, _ = plain_loop(RECIPES[recipe], data)
    model = build()
    opt, sched = RECIPES[recipe](model)
    a = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend=first)
    for b in data[:4]:
        a(b)
    ac.save(a, tmp_path)
    model = build()  # the same script, started again on the other backend
    opt, sched = RECIPES[recipe](model)
    b = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend=second)
    info = ac.load(tmp_path, b)
    assert info.step == 4 and b.step_count == 4
    outs = [b(x) for x in data[4:]]
    assert_close([o.loss for o in outs], want[4:], 1e-5, f"{first} -> {second}")
    # the LambdaLR's lambda came back from this script; its position from the checkpoint
    assert [o.lrs for o in outs] == want_lrs[4:]


def test_checkpoint_keeps_groups_and_per_group_hyperparameters(tmp_path):
    model = build()
    opt, sched = adamw_warmup(model)
    a = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend="cpu")
    for x in batches(2):
        a(x)
    manifest = ac.checkpoint.verify(ac.save(a, tmp_path))
    assert manifest["optimizer"]["type"] == "torch.optim.AdamW"
    groups = manifest["optimizer_state"]["groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[1]["params"] == ["inp.bias", "norm.weight", "norm.bias", "out.bias"]
    assert manifest["lr_scheduler"]["type"] == "LambdaLR" and manifest["lr_scheduler"]["state"]["last_epoch"] == 2
    model = build()
    opt2 = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if not no_decay(n, p)], "weight_decay": 0.5},
                              {"params": [p for n, p in model.named_parameters() if no_decay(n, p)]}], lr=2e-2)
    b = ac.TrainStep(model, loss_fn, opt2, backend="cpu")
    with pytest.raises(ac.CheckpointMismatchError, match="weight_decay"):
        ac.load(tmp_path, b)  # different hyperparameters: refused unless asked for
    ac.load(tmp_path, b, allow_optimizer_change=True)  # asked for: the new weight decay, the saved schedule
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.5, 0.01] and b.step_count == 2
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    model = build()  # one group: the saved per-group state has nowhere to go, even when allowed
    c = ac.TrainStep(model, loss_fn, torch.optim.AdamW(model.parameters(), lr=2e-2), backend="cpu")
    with pytest.raises(ac.CheckpointMismatchError, match="groups"):
        ac.load(tmp_path, c, allow_optimizer_change=True)
    with pytest.raises(ac.CheckpointMismatchError, match="type: checkpoint torch.optim.AdamW, step AdamW"):
        ac.load(tmp_path, ac.TrainStep(build(), loss_fn, ac.AdamW(lr=2e-2), backend="cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_update_does_not_advance_the_scheduler(backend):
    model = build()
    opt, sched = adamw_warmup(model)
    step = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend=backend, on_nonfinite="skip")
    data = batches(3)
    bad = (torch.full_like(data[1][0], float("nan")), data[1][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = [step(data[0]), step(bad), step(data[2])]
    assert [o.skipped for o in outs] == [False, True, False]
    assert [o.lr for o in outs] == pytest.approx([2e-2 / 3, 2e-2 * 2 / 3, 2e-2 * 2 / 3], rel=1e-12)
    assert sched.last_epoch == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_callable_schedule_with_a_torch_optimizer_and_with_a_spec(backend):
    factor = lambda s: 0.5 ** s  # noqa: E731
    data = batches(4)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    want, want_lrs, _, _ = plain_loop(lambda m: (o := torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                              torch.optim.lr_scheduler.LambdaLR(o, factor)), data)
    outs = [s(b) for s in [ac.TrainStep(model, loss_fn, opt, lr_scheduler=factor, backend=backend)] for b in data]
    assert_close([o.loss for o in outs], want, tolerance(backend))
    spec_step = ac.TrainStep(build(), loss_fn, ac.SGD(lr=0.1, momentum=0.9), lr_scheduler=factor, backend=backend)
    spec_outs = [spec_step(b) for b in data]
    assert_close([o.loss for o in spec_outs], want, 1e-5)
    assert [o.lr for o in spec_outs] == pytest.approx([w[0] for w in want_lrs], rel=1e-12)
    if backend.startswith("jax"):
        assert spec_step.engine.compiles == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_no_decay_groups_equal_torch_with_two_groups(backend):
    data = batches(5)

    def recipe(model):
        opt, _ = adamw_warmup(model)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    want, _, _, ref = plain_loop(recipe, data)
    step = ac.TrainStep(build(), loss_fn, ac.AdamW(lr=2e-2, weight_decay=0.1, no_decay=no_decay), backend=backend)
    outs = [step(b) for b in data]
    assert_close([o.loss for o in outs], want, tolerance(backend))
    assert_weights(step.model, ref, 1e-5)
    assert outs[0].lrs == (2e-2, 2e-2)  # one per group, as the torch optimizer has them


@NEEDS_JAX
def test_an_untranslatable_optimizer_is_refused_on_jax_naming_the_supported_ones():
    model = build()
    with pytest.raises(ac.UnsupportedOptimizerError, match=r"torch\.optim\.Adamax .*supported: torch\.optim\.SGD, torch\.optim\.Adam"):
        ac.TrainStep(model, loss_fn, torch.optim.Adamax(model.parameters()), backend="jax:cpu")


def test_bad_optimizer_and_scheduler_arguments_fail_up_front():
    model = build()
    opt, sched = adamw_warmup(model)
    with pytest.raises(ValueError, match="both set the learning rate schedule"):
        ac.TrainStep(model, loss_fn, ac.AdamW(schedule=ac.WarmupCosine(warmup=1, total=5)), lr_scheduler=lambda s: 1.0, backend="cpu")
    with pytest.raises(TypeError, match="built on a torch optimizer"):
        ac.TrainStep(model, loss_fn, ac.AdamW(), lr_scheduler=sched, backend="cpu")
    with pytest.raises(ValueError, match="built on another optimizer"):
        ac.TrainStep(model, loss_fn, adamw_warmup(model)[0], lr_scheduler=sched, backend="cpu")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] .* is not a parameter of model"):
        ac.TrainStep(model, loss_fn, adamw_warmup(build())[0], backend="cpu")
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        ac.TrainStep(model, loss_fn, opt, lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt), backend="cpu")
    with pytest.raises(TypeError, match="no_decay must be callable"):
        ac.AdamW(no_decay="bias")


def test_parallel_auto_outside_torchrun_is_one_process_and_n_copies_warn_once(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ac.TrainStep(build(), loss_fn, backend="cpu", parallel="auto").spec.parallel is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; this process joins nothing
    monkeypatch.setattr(step_module, "_warned_copies", False)
    with pytest.warns(UserWarning, match="torchrun started 2 processes but TrainStep\\(parallel=None\\)"):
        ac.TrainStep(build(), loss_fn, backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ac.TrainStep(build(), loss_fn, backend="cpu")  # once per process


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_update_leaves_the_scheduler_where_it_was(backend):
    """``on_nonfinite="raise"``: where the check is read one step late (jax), the scheduler
    stepped for the bad update is put back when the error comes."""
    model = build()
    opt, sched = adamw_warmup(model)
    step = ac.TrainStep(model, loss_fn, opt, lr_scheduler=sched, backend=backend)
    data = batches(3)
    step(data[0])
    with pytest.raises(ac.NonFiniteLossError, match="step 2"):
        step((torch.full_like(data[1][0], float("nan")), data[1][1]))
        step(data[2])  # a deferred check raises here
    assert step.step_count == 1 and sched.last_epoch == 1
    assert [g["lr"] for g in opt.param_groups] == [2e-2 * ((1 + 1) / 3)] * 2  # LambdaLR: base lr x factor(1)
