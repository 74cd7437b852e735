"""The JAX backend's route: a torch function calling the anychip ops, run by torchax under
jax.jit and jax.grad, with the ops mapped to their JAX implementations (jax_overrides)."""

from __future__ import annotations

import importlib

import pytest
import torch
from support import requires

import anychip.kernels as kernels
from anychip.kernels.attention import attention
from anychip.kernels.linear_cross_entropy import linear_cross_entropy
from anychip.kernels.rms_norm import rms_norm
from anychip.kernels.rotary import rotary, rotary_tables
from anychip.kernels.swiglu import swiglu

pytestmark = requires("jax", "torchax")

B, H, T, D, V = 2, 2, 8, 8, 37


def _model(params, targets, kernels="auto", rms_kernels="auto"):
    x, w, wqkv, wg, wu, head = params
    h = rms_norm(x, w, kernels=rms_kernels)
    q, k, v = (h @ wqkv).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    cos, sin = rotary_tables(T, D, device=q.device)
    q, k = rotary(q, k, cos, sin, kernels=kernels)
    a = attention(q, k, v, True, kernels=kernels).transpose(1, 2).reshape(B, T, H * D)
    m = swiglu(a @ wg, a @ wu, kernels=kernels)
    # the chunked JAX head is explicit-only (slower than the plain head on a GPU): ask for it
    head_kernels = "jax" if kernels == "auto" else kernels
    return linear_cross_entropy(m, head, targets, chunk_size=5, kernels=head_kernels)


def _params():
    gen = torch.Generator().manual_seed(0)
    shapes = [(B, T, 16), (16,), (16, 3 * H * D), (H * D, 24), (H * D, 24), (V, 24)]
    params = [torch.randn(s, generator=gen) * 0.3 for s in shapes]
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, :3] = -100
    return params, targets


@pytest.fixture
def env():
    """torchax's default environment with the overrides installed, restored afterwards.

    include_sdpa=False: the SDPA override would change torch's own attention for every later
    test in this process. (Environment._ops is torchax's op table; there is no public undo.)
    """
    import torchax

    environment = torchax.default_env()
    saved = dict(environment._ops)
    kernels.install_jax_overrides(environment, "cpu", include_sdpa=False)
    yield environment
    environment._ops.clear()
    environment._ops.update(saved)


def test_jit_and_grad_through_torchax_match_the_reference(env, monkeypatch):
    import jax
    import jax.numpy as jnp
    from torchax import interop

    from anychip.kernels.rms_norm import pallas

    calls = []  # the pallas override must really run (not torch code lowered op by op)
    original = pallas.rms_norm
    monkeypatch.setattr(pallas, "rms_norm", lambda *a, **k: calls.append(k) or original(*a, **k))

    params, targets = _params()
    wide = [p.double().requires_grad_(True) for p in params]
    expected = _model(wide, targets, kernels="reference", rms_kernels="reference")
    expected_grads = torch.autograd.grad(expected, wide)

    loss_fn = interop.jax_view(lambda p, t: _model(p, t, rms_kernels="pallas"))
    jax_params = [jnp.asarray(p.numpy()) for p in params]
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(jax_params, jnp.asarray(targets.numpy()))
    assert calls and calls[0] == {"interpret": True}
    assert abs(float(loss) - expected.item()) < 1e-5
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(torch.from_numpy(jax.device_get(g).copy()).double(), e, rtol=1e-4, atol=1e-5)


def test_backend_is_inferred_from_the_torchax_device(env, monkeypatch):
    import jax.numpy as jnp
    from torchax import interop

    seen = []
    select_module = importlib.import_module("anychip.kernels.selection")
    original = select_module.select
    monkeypatch.setattr(
        select_module, "select", lambda op, backend, mode="auto": seen.append(backend) or original(op, backend, mode)
    )
    interop.jax_view(lambda a, b: swiglu(a, b))(jnp.ones((2, 3)), jnp.ones((2, 3)))
    assert seen == ["jax:cpu"]


def test_override_backward_ops_match_the_reference():
    """The <op>_backward overrides (used when torch autograd drives torchax)."""
    import jax.numpy as jnp

    from anychip.kernels.rms_norm import reference as rms_reference
    from anychip.kernels.swiglu import reference as swiglu_reference

    overrides = kernels.jax_overrides("cpu", include_sdpa=False)
    x, w, dy = torch.randn(3, 5), torch.randn(5), torch.randn(3, 5)
    dx, dw = overrides[torch.ops.anychip.rms_norm_backward.default](
        jnp.asarray(dy.numpy()), jnp.asarray(x.numpy()), jnp.asarray(w.numpy()), 1e-6, "jax"
    )
    ex, ew = rms_reference.rms_norm_backward(dy, x, w, 1e-6)
    torch.testing.assert_close(torch.from_numpy(jnp.asarray(dx).__array__().copy()), ex, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(jnp.asarray(dw).__array__().copy()), ew, rtol=1e-5, atol=1e-5)
    dg, du = overrides[torch.ops.anychip.swiglu_backward.default](
        jnp.asarray(dy.numpy()), jnp.asarray(x.numpy()), jnp.asarray(x.numpy() * 2), "jax"
    )
    eg, eu = swiglu_reference.swiglu_backward(dy, x, x * 2)
    torch.testing.assert_close(torch.from_numpy(jnp.asarray(dg).__array__().copy()), eg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(jnp.asarray(du).__array__().copy()), eu, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'triton' is not a JAX implementation"):
        overrides[torch.ops.anychip.swiglu.default](jnp.ones(2), jnp.ones(2), "triton")


def test_overrides_cover_every_op_and_its_backward():
    import torch.nn.functional as F

    overrides = kernels.jax_overrides("jax:tpu")
    for op in kernels.OPS:
        assert getattr(torch.ops.anychip, op).default in overrides
        assert getattr(torch.ops.anychip, f"{op}_backward").default in overrides
    assert F.scaled_dot_product_attention in overrides
    assert F.scaled_dot_product_attention not in kernels.jax_overrides("gpu", include_sdpa=False)
    with pytest.raises(ValueError, match="JAX platform must be"):
        kernels.jax_overrides("cuda")


def test_without_the_overrides_the_error_says_what_to_do(monkeypatch):
    import jax.numpy as jnp
    from torchax import interop

    monkeypatch.setattr(importlib.import_module("anychip.kernels.selection"), "_jax_overrides_made", False)  # as in a fresh process
    with pytest.raises(kernels.KernelUnavailableError, match=r"swiglu/jax runs through torchax: call anychip"):
        interop.jax_view(lambda a, b: swiglu(a, b))(jnp.ones((2, 3)), jnp.ones((2, 3)))


def test_environment_lowers_torch_sdpa_by_the_one_policy(monkeypatch):
    """environment(): torch's SDPA through jax.nn.dot_product_attention (what ran lands in
    ``used``); with kernels="reference" only batch_norm and promote_types are overridden."""
    import jax.numpy as jnp
    import torch.nn.functional as F

    used: set = set()
    env = kernels.environment("cpu", "auto", used)
    q = jnp.asarray(torch.randn(1, 2, 4, 8).numpy())
    with env:
        t = env.j2t_iso(q)
        out = env.t2j_iso(F.scaled_dot_product_attention(t, t, t, is_causal=True))
    expected = F.scaled_dot_product_attention(*(torch.from_numpy(jnp.asarray(q).__array__().copy()),) * 3, is_causal=True)
    torch.testing.assert_close(torch.from_numpy(jnp.asarray(out).__array__().copy()), expected, rtol=1e-5, atol=1e-5)
    assert used == {"attention:xla"}
    ours = lambda e, op: op in e._ops and e._ops[op].is_user_defined  # noqa: E731  (torchax's op table)
    assert ours(env, F.scaled_dot_product_attention) and ours(env, torch.ops.anychip.swiglu.default)
    plain = kernels.environment("cpu", "reference")
    assert not ours(plain, torch.ops.anychip.swiglu.default) and not ours(plain, F.scaled_dot_product_attention)
    assert ours(plain, F.batch_norm) and ours(plain, torch.promote_types)
    monkeypatch.setenv("ANYCHIP_KERNELS", "reference")
    assert not ours(kernels.environment("gpu"), F.scaled_dot_product_attention)
    row = {(r.op, r.name): r for r in kernels.available("jax:gpu")}[("attention", "jax")]
    assert "cuDNN" in row.note and "scaled_dot_product_attention" in row.note
