"""Bad input at the Python API, case by case: every public argument of TrainStep, of the
optimizer specs and of the schedules, and the loss and batch a step is given. Each must fail
with one anychip error of the expected class, on one line that names the argument, before
anything the user had is changed; and the inputs in GOOD must be accepted as what they mean.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anychip as ac
from support import requires

NAN, INF = float("nan"), float("inf")


def loss(m, b):
    return m(b).pow(2).mean()


def batch(n: int = 4):
    return torch.ones(n, 4)


def step(model, backend="cpu", **kw):
    return ac.TrainStep(model, kw.pop("loss_fn", loss), backend=backend, **kw)


def run(loss_fn, data=None, backend="cpu", **kw):
    """A step on ``data`` (a batch of 4 by default) with ``loss_fn``."""
    return lambda m: step(m, backend, loss_fn=loss_fn, **kw)(batch() if data is None else data)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    arg: str  # what the message must name
    make: Callable  # make(model): the bad call
    error: type


def _args(owner: str, make, error=ac.InvalidArgumentError, **values) -> list[Case]:
    """One case per keyword: ``field=[(label, value), ...]`` -> ``make(model, field=value)``."""
    return [Case(f"{owner}-{field}-{label}", field, lambda m, f=field, v=value: make(m, **{f: v}), error)
            for field, items in values.items() for label, value in items]


def _flag(none_ok: bool = False):
    bad = [("str-no", "no"), ("str-yes", "yes"), ("int-1", 1), ("int-0", 0), ("list", [True])]
    return bad if none_ok else bad + [("none", None)]


def _number(*extra, none_ok: bool = False, bool_too: bool = True):
    bad = [("nan", NAN), ("str", "1e-3"), ("list", [1e-3]), *extra]
    bad += [("true", True), ("false", False)] if bool_too else []
    return bad if none_ok else bad + [("none", None)]


def _train_step(m, **kw):
    return step(m, **kw)


def _other_model_optimizer(m):
    return step(m, optimizer=torch.optim.AdamW(torch.nn.Linear(4, 2).parameters()))


def _scheduler_on_another_optimizer(m):
    other = torch.optim.SGD(m.parameters(), lr=0.1)
    return step(m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), lr_scheduler=torch.optim.lr_scheduler.StepLR(other, 1))


def _plateau(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    return step(m, optimizer=opt, lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))


def _frozen(m):
    return step(m.requires_grad_(False))


def _split_in_two_then_fail(m):
    """accumulate=2: the first micro-batch is fine, the second returns no tensor."""
    calls = []

    def half_broken(model, b):
        calls.append(1)
        return loss(model, b) if len(calls) == 1 else float(loss(model, b).detach())

    return step(m, loss_fn=half_broken, accumulate=2)(batch())


TRAIN_STEP = [
    *_args("TrainStep", _train_step, compile=_flag(none_ok=True), strict_shapes=_flag(), split_batches=_flag()),
    *_args("TrainStep", _train_step,
           accumulate=[("zero", 0), ("negative", -1), ("float", 2.0), ("true", True), ("str", "2"), ("none", None)],
           max_grad_norm=[("zero", 0), ("negative", -1.0), ("nan", NAN), ("inf", INF), ("true", True), ("str", "1.0"),
                          ("list", [1.0])],
           on_nonfinite=[("typo", "warn"), ("empty", ""), ("none", None), ("true", True), ("list", ["raise"])],
           parallel=[("typo", "tp"), ("upper", "DDP"), ("int", 1), ("true", True), ("list", ["ddp"])],
           kernels=[("typo", "fast"), ("none", None), ("true", True), ("int", 0)],
           precision=[("typo", "bf61"), ("int", 16), ("none", None), ("list", ["fp32"]), ("true", True)],
           backend=[("int", 1), ("true", True), ("list", ["cpu"])],
           lr_scheduler=[("int", 3), ("str", "cosine")],
           optimizer=[("str", "adamw"), ("int", 1), ("class", torch.optim.AdamW)]),
    Case("TrainStep-backend-unknown", "backend", lambda m: step(m, backend="xpu"), ac.UnknownBackendError),
    Case("TrainStep-model-str", "model", lambda m: ac.TrainStep("model", loss, backend="cpu"), ac.InvalidArgumentError),
    Case("TrainStep-model-function", "model", lambda m: ac.TrainStep(lambda x: x, loss, backend="cpu"), ac.InvalidArgumentError),
    Case("TrainStep-model-frozen", "trainable", _frozen, ac.InvalidArgumentError),
    Case("TrainStep-loss_fn-str", "loss_fn", lambda m: ac.TrainStep(m, "mse", backend="cpu"), ac.InvalidArgumentError),
    Case("TrainStep-loss_fn-none", "loss_fn", lambda m: ac.TrainStep(m, None, backend="cpu"), ac.InvalidArgumentError),
    Case("TrainStep-optimizer-other-model", "optimizer", _other_model_optimizer, ac.InvalidArgumentError),
    Case("TrainStep-lr_scheduler-other-optimizer", "lr_scheduler", _scheduler_on_another_optimizer, ac.InvalidArgumentError),
    Case("TrainStep-lr_scheduler-plateau", "lr_scheduler", _plateau, ac.InvalidArgumentError),
    Case("TrainStep-lr_scheduler-and-schedule", "lr_scheduler",
         lambda m: step(m, optimizer=ac.AdamW(schedule=ac.WarmupCosine(warmup=1, total=5)), lr_scheduler=lambda s: 1.0),
         ac.InvalidArgumentError),
]


def _adamw(m, **kw):
    return ac.AdamW(**kw)


def _sgd(m, **kw):
    return ac.SGD(**kw)


SPECS = [
    *_args("AdamW", _adamw,
           lr=_number(("negative", -1e-3), ("inf", INF), ("1d-tensor", torch.tensor([1e-3])), ("bool-tensor", torch.tensor(True))),
           eps=_number(("zero", 0), ("negative", -1e-8), ("inf", INF)),
           weight_decay=_number(("negative", -0.1), ("inf", INF)),
           betas=[("str", "ab"), ("one", (0.9,)), ("three", (0.9, 0.99, 0.9)), ("b1-one", (1.0, 0.999)), ("b2-one", (0.9, 1.0)),
                  ("negative", (-0.1, 0.9)), ("bool", (True, 0.9)), ("nan", (0.9, NAN)), ("strs", ("0.9", "0.999")),
                  ("none", None), ("number", 0.9), ("set", {0.9, 0.99})],
           schedule=[("str", "cosine"), ("none", None), ("callable", lambda s: 1.0), ("class", ac.WarmupCosine)],
           no_decay=[("str", "bias"), ("int", 1), ("true", True)]),
    *_args("SGD", _sgd,
           lr=_number(("negative", -0.1), ("inf", INF)),
           momentum=_number(("above-one", 1.5), ("one", 1.0), ("negative", -0.5)),
           weight_decay=_number(("negative", -1.0), ("inf", INF), bool_too=False),
           nesterov=[("str", "yes"), ("int", 1), ("none", None)],
           schedule=[("str", "cosine")],
           no_decay=[("str", "bias")]),
    Case("SGD-nesterov-without-momentum", "momentum", lambda m: ac.SGD(nesterov=True), ac.InvalidArgumentError),
]


def _schedule(cls):
    def make(m, **kw):
        args = {"warmup": 10, "total": 100, **kw}
        return cls(**args)

    return make


SCHEDULES = [
    case
    for cls in (ac.WarmupCosine, ac.WarmupLinear)
    for case in _args(cls.__name__, _schedule(cls),
           warmup=[("true", True), ("negative", -1), ("float", 1.5), ("str", "10"), ("none", None), ("nan", NAN)],
           total=[("zero", 0), ("true", True), ("float", 2.5), ("str", "100"), ("none", None), ("below-warmup", 5)],
           min_ratio=[("str", "x"), ("negative", -0.1), ("above-one", 1.5), ("nan", NAN), ("true", True), ("none", None),
                      ("inf", INF)])
]

LOSS_AND_BATCH = [
    Case("loss-numpy-scalar", "loss_fn", run(lambda m, b: np.float32(loss(m, b).item())), ac.LossFunctionError),
    Case("loss-python-float", "loss_fn", run(lambda m, b: loss(m, b).item()), ac.LossFunctionError),
    Case("loss-constant-tensor", "loss_fn", run(lambda m, b: torch.tensor(1.0)), ac.LossFunctionError),
    Case("loss-detached", "loss_fn", run(lambda m, b: loss(m, b).detach()), ac.LossFunctionError),
    Case("loss-batch-only", "loss_fn", run(lambda m, b: b.pow(2).mean()), ac.LossFunctionError),
    Case("loss-not-scalar", "loss_fn", run(lambda m, b: m(b)), ac.LossFunctionError),
    Case("loss-integer", "loss_fn", run(lambda m, b: m(b).sum().long()), ac.LossFunctionError),
    Case("loss-raises", "loss_fn", run(lambda m, b: F.cross_entropy(m(b), torch.ones(4, dtype=torch.long) * 7)), ac.LossFunctionError),
    Case("loss-second-micro-batch", "loss_fn", _split_in_two_then_fail, ac.LossFunctionError),
    Case("batch-empty", "batch", run(loss, batch(0)), ac.InvalidArgumentError),
    Case("batch-empty-leaf", "batch[1]", run(lambda m, b: loss(m, b[0]), (batch(), torch.ones(0))), ac.InvalidArgumentError),
    Case("batch-empty-dict", "batch", run(loss, {}), ac.InvalidArgumentError),
    Case("batch-none", "batch", run(loss, [None]), ac.InvalidArgumentError),
    Case("batch-numpy", "batch", run(loss, np.ones((4, 4), np.float32)), ac.InvalidArgumentError),
    Case("batch-str", "batch", run(loss, "text"), ac.InvalidArgumentError),
    Case("batch-indivisible", "accumulate", run(loss, batch(5), accumulate=2), ac.InvalidArgumentError),
]

_JAX = requires("jax", "torchax", "optax")
JAX_CASES = [
    Case("jax-loss-numpy-scalar", "loss_fn", run(lambda m, b: np.float32(1.0), backend="jax:cpu"), ac.LossFunctionError),
    Case("jax-loss-constant-tensor", "loss_fn", run(lambda m, b: torch.tensor(1.0), backend="jax:cpu"), ac.LossFunctionError),
    Case("jax-loss-batch-only", "loss_fn", run(lambda m, b: b.pow(2).mean(), backend="jax:cpu", accumulate=2),
         ac.LossFunctionError),
    Case("jax-batch-empty", "batch", run(loss, batch(0), backend="jax:cpu"), ac.InvalidArgumentError),
]

CASES = TRAIN_STEP + SPECS + SCHEDULES + LOSS_AND_BATCH + JAX_CASES


def test_the_cases_are_many_and_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) >= 100 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_JAX if c in JAX_CASES else ()) for c in CASES])
def test_bad_input_is_one_clear_error_and_changes_nothing(case):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ac.AnychipError) as err:
        case.make(model)
    assert isinstance(err.value, case.error), f"{type(err.value).__name__}: {err.value}"
    message = str(err.value)
    assert message and "\n" not in message, message
    assert case.arg in message, message
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.grad is None, f"{name} keeps a gradient of the failed step"


# -- accepted: what these inputs mean ---------------------------------------------------------------------


def _lr(spec):
    return type(spec.lr), spec.lr


GOOD = [
    ("np.float32-lr", lambda: ac.AdamW(lr=np.float32(0.5)), lambda s: _lr(s) == (float, 0.5)),
    ("np.float64-lr", lambda: ac.SGD(lr=np.float64(0.25)), lambda s: _lr(s) == (float, 0.25)),
    ("0-d-tensor-lr", lambda: ac.AdamW(lr=torch.tensor(0.5)), lambda s: _lr(s) == (float, 0.5)),
    ("int-lr", lambda: ac.SGD(lr=1), lambda s: _lr(s) == (float, 1.0)),
    ("zero-lr", lambda: ac.SGD(lr=0.0), lambda s: s.lr == 0.0),
    ("betas-list", lambda: ac.AdamW(betas=[0.8, 0.9]), lambda s: s.betas == (0.8, 0.9) and hash(s)),
    ("betas-tuple-np", lambda: ac.AdamW(betas=(np.float32(0.5), 0)), lambda s: s.betas == (0.5, 0.0)),
    ("np-int-schedule", lambda: ac.WarmupCosine(np.int64(2), np.int32(8), np.float32(0.5)),
     lambda s: (type(s.warmup), type(s.total), s.min_ratio) == (int, int, 0.5)),
    ("warmup-equals-total", lambda: ac.WarmupLinear(warmup=5, total=5), lambda s: s.value(4) == 1.0),
    ("nesterov-np-bool", lambda: ac.SGD(momentum=0.9, nesterov=np.bool_(True)), lambda s: s.nesterov is True),
    ("accumulate-np-int", lambda: step(torch.nn.Linear(4, 2), accumulate=np.int64(2)), lambda s: s.spec.accumulate == 2),
    ("max_grad_norm-int", lambda: step(torch.nn.Linear(4, 2), max_grad_norm=1), lambda s: s.spec.max_grad_norm == 1.0),
    ("compile-none", lambda: step(torch.nn.Linear(4, 2), compile=None), lambda s: s.spec.compile is None),
]


@pytest.mark.parametrize("make, holds", [pytest.param(m, h, id=i) for i, m, h in GOOD])
def test_good_input_is_accepted(make, holds):
    assert holds(make())


def test_bf16_pure_takes_float32_inputs_and_trains():
    torch.manual_seed(0)
    trained = step(torch.nn.Linear(4, 2), precision="bf16-pure", optimizer=ac.SGD(lr=np.float32(0.1)))
    start = trained.model.weight.detach().clone()
    out = trained(torch.randn(4, 4))  # float32 inputs into bf16 weights: cast, not refused
    assert math.isfinite(out.loss) and out.lr == pytest.approx(0.1)
    assert trained.model.weight.dtype == torch.bfloat16
    assert not torch.equal(trained.model.weight, start)
