"""A user's torch.optim optimizer translated for the jax backends: each supported class with two
parameter groups of different hyperparameters follows torch.optim's own step, a scheduler
changing lr / momentum / betas between steps follows torch without recompiling, the state maps
to torch's slots and back, and what cannot be translated is refused with the supported list."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support import requires

pytestmark = requires("jax")

SHAPES = {"a.weight": (5, 7), "a.bias": (7,), "b.weight": (7, 3), "b.bias": (3,)}
MATRICES = {"a.weight": (5, 7), "b.weight": (7, 3), "c.weight": (4, 4)}  # Muon: 2-D only, wide and tall
RTOL, ATOL = 1e-6, 1e-7


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen).requires_grad_() for n, s in shapes.items()}


def _two_groups(params, first: dict, second: dict):
    names = list(params)
    half = (len(names) + 1) // 2
    return [{"params": [params[n] for n in names[:half]], **first}, {"params": [params[n] for n in names[half:]], **second}]


def _one_cycle(opt, steps, momentum):
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps, cycle_momentum=momentum, pct_start=0.4
    )


def _warmup(opt, steps, momentum):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 3 if s < 3 else 0.9 ** (s - 2))  # warm-up, then decay


# (name, class, first group, second group, shapes, scheduler): every structural option on in
# one group and off in the other where the class has one.
CASES = [
    ("sgd-nesterov", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
     dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.0), SHAPES, _one_cycle),
    ("sgd-plain-maximize", torch.optim.SGD, dict(lr=0.1, weight_decay=0.1, maximize=True),
     dict(lr=0.02), SHAPES, _warmup),
    ("adam-l2-amsgrad", torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
     dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6), SHAPES, _one_cycle),
    ("adamw", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1),
     dict(lr=3e-3, weight_decay=0.0, betas=(0.85, 0.95), amsgrad=True), SHAPES, _one_cycle),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.1),
     dict(lr=3e-3, eps=1e-6), SHAPES, _warmup),
    ("rmsprop-cycled-momentum", torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9),
     dict(lr=3e-3, momentum=0.5, centered=True), SHAPES, _one_cycle),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.1),
     dict(lr=0.03, eps=1e-6), SHAPES, _warmup),
]
if hasattr(torch.optim, "Muon"):
    CASES.append(("muon", torch.optim.Muon, dict(lr=0.02, weight_decay=0.1),
                  dict(lr=0.01, weight_decay=0.0, nesterov=False, adjust_lr_fn="match_rms_adamw"), MATRICES, _one_cycle))


def _case(name):
    return next(c for c in CASES if c[0] == name)


def _build(case, seed=0):
    from anychip.backends.jax.optimizers import translate

    _, cls, first, second, shapes, _ = case
    params = _params(shapes, seed)
    opt = cls(_two_groups(params, first, second))
    by_id = {id(p): n for n, p in params.items()}
    return params, opt, by_id, translate(opt, list(params), by_id)


def _grads(shapes, gen):
    return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}


def _torch_step(params, opt, grads):
    for n, p in params.items():
        p.grad = grads[n].clone()
    opt.step()


def _assert_params(jparams, params, step):
    for n, p in params.items():
        np.testing.assert_allclose(np.asarray(jparams[n]), p.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=f"{n} after step {step}")


def _assert_state(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for n in want:
        assert sorted(got[n]) == sorted(want[n]), n
        for slot, value in want[n].items():
            assert got[n][slot].dtype == value.dtype, (n, slot)
            # XLA fuses a * b + c into one FMA where torch rounds twice: an element that nearly
            # cancels (a momentum buffer changing sign) is then off by an ulp of the terms, so
            # the tolerance is relative to the slot's scale.
            atol = RTOL * float(value.abs().max()) + ATOL
            np.testing.assert_allclose(got[n][slot].numpy(), value.numpy(), rtol=RTOL, atol=atol, err_msg=f"{slot} of {n}")


# The optimizer's own state by parameter name, the layout state_to_torch / state_from_torch use
# (the engines store theirs through anychip.user_optimizer; these only read torch's for comparison).
def torch_state_by_name(optimizer, params_by_id: dict) -> dict:
    """``optimizer.state`` as ``{name: {slot: tensor}}`` (the layout of ``state_from_torch``)."""
    return {params_by_id[id(p)]: dict(s) for p, s in optimizer.state.items() if s and id(p) in params_by_id}


def load_torch_state(optimizer, per_param: dict, params_by_id: dict) -> None:
    """Put ``{name: {slot: tensor}}`` into ``optimizer`` through its own ``load_state_dict``,
    which places each slot on its parameter's device and dtype as torch's policy says."""
    index, k = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index[params_by_id[id(p)]] = k
            k += 1
    sd = optimizer.state_dict()
    sd["state"] = {index[n]: {s: v.clone() for s, v in slots.items()} for n, slots in per_param.items()}
    optimizer.load_state_dict(sd)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_translated_step_follows_torch_with_a_scheduler_and_no_recompile(case):
    import jax
    import jax.numpy as jnp

    steps, shapes = 6, case[4]
    params, opt, by_id, tr = _build(case)
    sched = case[5](opt, steps, True)
    jparams = {n: jnp.asarray(p.detach().numpy()) for n, p in params.items()}
    state = tr.init(jparams)
    traces = []

    @jax.jit
    def step(jparams, state, grads, hyper):
        traces.append(1)  # Python runs here once per trace
        return tr.apply(grads, state, jparams, hyper)

    gen, seen = torch.Generator().manual_seed(1), set()
    for k in range(steps):
        grads = _grads(shapes, gen)
        hyper = tr.hyper_from(opt)
        seen.add(hyper.tobytes())
        jparams, state = step(jparams, state, {n: jnp.asarray(g.numpy()) for n, g in grads.items()}, hyper)
        _torch_step(params, opt, grads)
        sched.step()
        _assert_params(jparams, params, k + 1)
    assert len(seen) == steps, "the scheduler should have changed the hyperparameters every step"
    assert len(traces) == 1, f"{len(traces)} traces for {steps} steps"
    _assert_state(tr.state_to_torch(state), torch_state_by_name(opt, by_id))


def test_one_cycle_moves_momentum_and_beta1_through_hyper():
    # The momentum / betas[0] columns really are the group's current values.
    for name, field in (("sgd-nesterov", "momentum"), ("adamw", "one_minus_beta1")):
        _, opt, _, tr = _build(_case(name))
        sched = _one_cycle(opt, 6, True)
        before = tr.hyper_from(opt)[:, tr.fields.index(field)].copy()
        opt.step()  # no grads: nothing moves but the schedule
        sched.step()
        after = tr.hyper_from(opt)[:, tr.fields.index(field)]
        assert (before != after).all(), (name, before, after)


def test_update_is_optax_compatible():
    import jax
    import jax.numpy as jnp
    import optax

    params, opt, _, tr = _build(_case("adamw"))
    jparams = {n: jnp.asarray(p.detach().numpy()) for n, p in params.items()}
    state, gen, update = tr.init(jparams), torch.Generator().manual_seed(1), jax.jit(tr.update)
    for k in range(3):
        grads = _grads(SHAPES, gen)
        updates, state = update({n: jnp.asarray(g.numpy()) for n, g in grads.items()}, state, jparams, tr.hyper_from(opt))
        jparams = optax.apply_updates(jparams, updates)
        _torch_step(params, opt, grads)
        _assert_params(jparams, params, k + 1)


TRANSLATED = ["sgd-nesterov", "adam-l2-amsgrad", "rmsprop", "adagrad"] + (["muon"] if hasattr(torch.optim, "Muon") else [])


@pytest.mark.parametrize("name", TRANSLATED)
def test_state_round_trips_and_resumes_either_way(name):
    import jax
    import jax.numpy as jnp

    case = _case(name)
    shapes = case[4]
    params, opt, by_id, tr = _build(case)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        _torch_step(params, opt, _grads(shapes, gen))
    theirs = torch_state_by_name(opt, by_id)
    jparams = {n: jnp.asarray(p.detach().numpy()) for n, p in params.items()}
    state = tr.state_from_torch(theirs, jparams)
    apply = jax.jit(tr.apply)
    _assert_state(tr.state_to_torch(state), theirs)  # torch -> jax -> torch is torch's own state

    # torch -> jax resume: two more steps on each side agree.
    twin_params, twin_opt, twin_by_id, _ = _build(case)
    with torch.no_grad():
        for n, p in twin_params.items():
            p.copy_(params[n])
    for _ in range(2):
        grads = _grads(shapes, gen)
        jparams, state = apply({n: jnp.asarray(g.numpy()) for n, g in grads.items()}, state, jparams, tr.hyper_from(opt))
        _torch_step(params, opt, grads)
        _assert_params(jparams, params, "resume")
    # jax -> torch resume: the translated state loaded into a fresh optimizer continues as torch.
    with torch.no_grad():
        for n, p in twin_params.items():
            p.copy_(torch.from_numpy(np.array(jparams[n])))
    load_torch_state(twin_opt, tr.state_to_torch(state), twin_by_id)
    grads = _grads(shapes, gen)
    _torch_step(params, opt, grads)
    _torch_step(twin_params, twin_opt, grads)
    for n, p in params.items():
        torch.testing.assert_close(twin_params[n], p, rtol=RTOL, atol=ATOL)


def test_fresh_state_maps_to_torch_before_the_first_step():
    import jax.numpy as jnp

    for name in ("sgd-nesterov", "adagrad"):  # lazily created state, and Adagrad's eager one
        params, opt, by_id, tr = _build(_case(name))
        state = tr.init({n: jnp.asarray(p.detach().numpy()) for n, p in params.items()})
        _assert_state(tr.state_to_torch(state), torch_state_by_name(opt, by_id))


def test_parameters_outside_the_optimizer_stay_put():
    import jax.numpy as jnp

    from anychip.backends.jax.optimizers import translate

    params = _params(SHAPES)
    opt = torch.optim.SGD([params["a.weight"]], lr=0.1)
    tr = translate(opt, list(params), {id(p): n for n, p in params.items()})
    jparams = {n: jnp.asarray(p.detach().numpy()) for n, p in params.items()}
    grads = {n: jnp.ones_like(v) for n, v in jparams.items()}
    updates, _ = tr.update(grads, tr.init(jparams), jparams, tr.hyper_from(opt))
    assert sorted(updates) == sorted(params)
    assert all(not np.asarray(updates[n]).any() for n in params if n != "a.weight")
    assert np.asarray(updates["a.weight"]).all()


def test_bfloat16_parameters_keep_their_dtype_and_follow_torch():
    import jax
    import jax.numpy as jnp

    from anychip.backends.jax.optimizers import translate

    for name in ("sgd-nesterov", "adamw"):
        _, cls, first, second, shapes, _ = _case(name)
        params = {n: p.detach().bfloat16().requires_grad_() for n, p in _params(shapes).items()}
        opt = cls(_two_groups(params, first, second))
        tr = translate(opt, list(params), {id(p): n for n, p in params.items()})
        jparams = {n: jnp.asarray(p.detach().float().numpy()).astype(jnp.bfloat16) for n, p in params.items()}
        state, apply, gen = tr.init(jparams), jax.jit(tr.apply), torch.Generator().manual_seed(1)
        for _ in range(3):
            grads = {n: g.bfloat16() for n, g in _grads(shapes, gen).items()}
            jgrads = {n: jnp.asarray(g.float().numpy()).astype(jnp.bfloat16) for n, g in grads.items()}
            jparams, state = apply(jgrads, state, jparams, tr.hyper_from(opt))
            _torch_step(params, opt, grads)
        assert {v.dtype for slot, by_name in state.items() if slot != "step" for v in by_name.values()} == {jnp.dtype(jnp.bfloat16)}
        for n, p in params.items():
            assert jparams[n].dtype == jnp.bfloat16
            # XLA keeps excess precision between bf16 ops where torch rounds: an ulp or two
            np.testing.assert_allclose(np.asarray(jparams[n].astype(jnp.float32)), p.detach().float().numpy(), rtol=1e-2, atol=1e-2)


def _supported_message(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for cls in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad"):
        assert f"torch.optim.{cls}" in msg
    return msg


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.LBFGS(ps),
    lambda ps: torch.optim.Adamax(ps),
    lambda ps: torch.optim.NAdam(ps),
    lambda ps: type("MyAdam", (torch.optim.Adam,), {})(ps),
], ids=["LBFGS", "Adamax", "NAdam", "subclass"])
def test_unsupported_optimizers_are_refused_with_the_supported_list(make):
    from anychip.backends.jax.optimizers import translate
    from anychip.errors import UnsupportedOptimizerError

    params = _params(SHAPES)
    opt = make(list(params.values()))
    with pytest.raises(UnsupportedOptimizerError) as excinfo:
        translate(opt, list(params), {id(p): n for n, p in params.items()})
    msg = _supported_message(excinfo)
    assert type(opt).__name__ in msg
    assert ("subclass of torch.optim.Adam" in msg) == (type(opt).__name__ == "MyAdam")
    assert isinstance(excinfo.value, ValueError)


def test_foreign_parameters_and_structural_changes_are_refused():
    from anychip.backends.jax.optimizers import translate

    params = _params(SHAPES)
    stranger = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"shape \(2, 2\) that is not a trainable parameter"):
        translate(torch.optim.SGD([*params.values(), stranger], lr=0.1), list(params), {id(p): n for n, p in params.items()})
    _, opt, _, tr = _build(_case("sgd-nesterov"))
    opt.param_groups[1]["momentum"] = 0.0  # momentum on -> off: a buffer the step was built with
    with pytest.raises(ValueError, match="param group 1 changed momentum"):
        tr.hyper_from(opt)
