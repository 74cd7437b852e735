"""`OptimizerSpec.to_optax()` against `to_torch()` on the same gradients: the same math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import anychip as ac
from support import requires

pytestmark = requires("jax", "optax")

SHAPES = {"w": (5, 7), "b": (7,), "tiny": (3,)}
SPECS = {
    "adamw-wd-cosine": ac.AdamW(lr=1e-2, weight_decay=0.1, schedule=ac.WarmupCosine(warmup=3, total=12)),
    "adamw-beta1-0": ac.AdamW(lr=1e-2, betas=(0.0, 0.99), eps=1e-6, weight_decay=0.0),
    "sgd-nesterov-wd-linear": ac.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, schedule=ac.WarmupLinear(warmup=2, total=12)),
    "sgd-momentum": ac.SGD(lr=0.1, momentum=0.9),
    "sgd-plain": ac.SGD(lr=0.1),
}


def run_both(spec, steps=12):
    import jax
    import jax.numpy as jnp
    import optax

    g = torch.Generator().manual_seed(0)
    init = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    grads = [{k: torch.randn(*s, generator=g) * 10.0 ** (i % 4 - 2) for k, s in SHAPES.items()} for i in range(steps)]
    tparams = {k: v.clone().requires_grad_() for k, v in init.items()}
    opt = spec.to_torch(list(tparams.values()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: spec.schedule.value(s))  # the torch reference
    tx = spec.to_optax()
    jparams = {k: jnp.asarray(v.numpy()) for k, v in init.items()}
    state = tx.init(jparams)
    update = jax.jit(tx.update)
    for grad in grads:
        for k, p in tparams.items():
            p.grad = grad[k].clone()
        opt.step()
        sched.step()
        updates, state = update({k: jnp.asarray(v.numpy()) for k, v in grad.items()}, state, jparams)
        jparams = optax.apply_updates(jparams, updates)
    return opt, tparams, state, jparams


@pytest.mark.parametrize("name", list(SPECS))
def test_to_optax_matches_torch_optim(name):
    spec = SPECS[name]
    opt, tparams, state, jparams = run_both(spec)
    assert int(state.count) == 12
    for k, p in tparams.items():
        want = p.detach().numpy()
        # float32 rounding only: a few ulps of the parameter's scale after 12 updates
        np.testing.assert_allclose(np.asarray(jparams[k]), want, rtol=0, atol=2e-6 * np.abs(want).max(), err_msg=k)
        for slot in spec.slots:
            got, ref = np.asarray(getattr(state, slot)[k]), opt.state[p][slot].numpy()
            np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max(), err_msg=f"{slot}/{k}")


def test_state_fields_are_the_slot_names():
    import jax.numpy as jnp

    for spec in SPECS.values():
        state = spec.to_optax().init({"p": jnp.zeros(3)})
        assert state._fields == ("count", *spec.slots) or (not spec.slots and state.momentum_buffer is None)


def test_update_needs_params():
    import jax.numpy as jnp

    tx = ac.AdamW().to_optax()
    params = {"p": jnp.zeros(3)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))


def test_bias_correction_is_float64_accurate_in_float32():
    import jax.numpy as jnp

    from anychip.backends.jax.optimizer_math import bias_correction

    for beta in (0.9, 0.999, 0.9999):
        for t in (1, 2, 10, 1000):
            got = float(bias_correction(math.log(beta), jnp.float32(t)))
            want = 1 - beta**t
            assert abs(got - want) <= 5e-7 * want, (beta, t, got, want)
    assert float(bias_correction(-math.inf, jnp.float32(3))) == 1.0
    naive = float(np.float32(1) - np.float32(0.999) ** np.float32(1))  # what float32 `1 - b**t` gives
    assert abs(naive - 1e-3) > 1e-5 * 1e-3
