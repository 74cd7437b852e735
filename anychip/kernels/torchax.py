"""The one place that assembles torchax op overrides for the JAX backend.

torchax runs the torch model by lowering each torch op to JAX. ``environment`` builds a torchax
environment of its own (overrides there never leak into other code) with:

* anychip's custom ops (``torch.ops.anychip.<op>`` and ``<op>_backward``) -> their JAX/Pallas
  implementations, named by the implementation the torch side selected;
* torch's ``scaled_dot_product_attention`` -> ``anychip.kernels.attention.jax.sdpa``, the same
  lowering policy anychip's attention op uses (cuDNN, then XLA; the reference for dropout);
* ``F.batch_norm`` with torch's running-statistics update (the cumulative average of
  ``momentum=None`` included, with :func:`cumulative_batch_norm` around the trace), and
  ``torch.promote_types`` run natively: torchax 0.0.14 lacks both (see the functions below).

With kernels="reference" (or ANYCHIP_KERNELS=reference) only the last two are installed.
jax and torchax are imported when these functions run, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch

from anychip.kernels import attention, linear_cross_entropy, rms_norm, rotary, swiglu
from anychip.kernels.scope import ENV_VAR
from anychip.kernels.selection import mark_jax_overrides_made

_OP_PACKAGES = (rms_norm, linear_cross_entropy, swiglu, rotary, attention)
# torchax looks up an op's overload first and its packet second: cover both, and the F. entry.
_SDPA_KEYS = (
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)


def _jax_platform(platform: str) -> str:
    name = platform.removeprefix("jax:")
    if name not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"JAX platform must be cpu, gpu or tpu (or jax:*), got {platform!r}")
    return name


def _sdpa(platform: str, env: Any = None, used: set | None = None) -> Callable[..., Any]:
    """torch's SDPA contract on jax arrays; dropout keys come from ``env`` (default: torchax's)."""
    from anychip.kernels.attention import jax as jax_attention

    def dropout_key():
        if env is not None:
            return env.get_and_rotate_prng_key()
        import torchax

        return torchax.default_env().get_and_rotate_prng_key()

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return jax_attention.sdpa(
            platform, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            dropout_key=dropout_key, used=used,
        )

    return sdpa


def jax_overrides(
    platform: str, *, include_sdpa: bool = True, env: Any = None, used: set | None = None
) -> dict[Any, Callable[..., Any]]:
    """``{torch op: jax function}`` for torchax, for the JAX platform "cpu" | "gpu" | "tpu".

    Keys are the ``torch.ops.anychip.<op>.default`` overloads (forward and ``<op>_backward``);
    each value takes jax arrays plus the op's scalar arguments, including the implementation
    name the torch side selected. With ``include_sdpa`` also torch's scaled_dot_product_attention
    (``used`` collects what it ran, e.g. "attention:cudnn"). Register the values with
    ``install_jax_overrides`` or ``env.override_op_definition(op, torchax.interop.torch_view(fn))``.
    """
    name = _jax_platform(platform)
    overrides: dict[Any, Callable[..., Any]] = {}
    for package in _OP_PACKAGES:
        overrides.update(package.jax_overrides(name))
    if include_sdpa:
        sdpa = _sdpa(name, env, used)
        overrides.update(dict.fromkeys(_SDPA_KEYS, sdpa))
    mark_jax_overrides_made()
    return overrides


def install_jax_overrides(env: Any, platform: str, *, include_sdpa: bool = True, used: set | None = None) -> None:
    """Register ``jax_overrides(platform)`` in a torchax environment (``torchax.default_env()``)."""
    from torchax import interop

    for op, fn in jax_overrides(platform, include_sdpa=include_sdpa, env=env, used=used).items():
        env.override_op_definition(op, interop.torch_view(fn))


class CumulativeAverage(float):
    """What a ``momentum=None`` BatchNorm carries while it is traced. torch's module turns
    ``None`` into the factor ``1 / float(num_batches_tracked)``, a host read of a value the trace
    only has as data (the step fails there, pointing at the loss_fn line). This float is 0.0 to
    the module, which passes it on as the momentum; the batch_norm override below recognises it
    and takes ``1 / num_batches_tracked`` from the module's counter, as traced data."""

    module: Any

    def __new__(cls, module):
        self = super().__new__(cls, 0.0)
        self.module = module
        return self


def batch_norms(model) -> list:
    """The BatchNorm layers of ``model`` that keep running statistics (found once per step
    builder: :func:`cumulative_batch_norm` runs around every step)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def cumulative_batch_norm(layers: list):
    """Every layer of ``layers`` (from :func:`batch_norms`) with ``momentum=None`` carries a
    :class:`CumulativeAverage` for the duration (the trace of a step); ``None`` again afterwards."""
    swapped = [m for m in layers if m.momentum is None]
    for m in swapped:
        m.momentum = CumulativeAverage(m)
    try:
        yield
    finally:
        for m in swapped:
            m.momentum = None


def _batch_norm(env: Any) -> Callable[..., Any]:
    """``F.batch_norm`` with torch's running-statistics update. torchax 0.0.14 computes the new
    running mean/var and drops them, so a BatchNorm model would silently keep its initial
    statistics; here they are written into the buffer tensors, which the step carries out."""
    import jax
    import jax.numpy as jnp

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        x, rm, rv, w, b = env.t2j_iso((input, running_mean, running_var, weight, bias))
        axes, shape = (0, *range(2, x.ndim)), (1, -1) + (1,) * (x.ndim - 2)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if isinstance(momentum, CumulativeAverage):
            # The module has counted this batch already (num_batches_tracked.add_(1) comes first).
            count = momentum.module.num_batches_tracked
            momentum = 0.0 if count is None else 1.0 / env.t2j_iso(count).astype(jnp.float32)
        if training or rm is None:
            mean, var = xf.mean(axes), xf.var(axes)
            if training and rm is not None:
                n = x.size // x.shape[1]

                def stat(old, new):
                    return jax.lax.stop_gradient(momentum * new + (1 - momentum) * old).astype(old.dtype)

                running_mean.apply_jax_(lambda old: stat(old, mean))
                running_var.apply_jax_(lambda old: stat(old, var * n / max(n - 1, 1)))  # unbiased, as torch
        else:
            mean, var = rm, rv
        y = (xf - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + eps)
        if w is not None:
            y = y * w.reshape(shape)
        if b is not None:
            y = y + b.reshape(shape)
        return env.j2t_iso(y.astype(x.dtype))

    return batch_norm


def _promote_types(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` works on dtypes, not tensors; torchax 0.0.14 has no lowering for
    it (anychip's reference kernels call it), so it runs natively, outside torchax's modes."""
    from torch.utils._mode_utils import no_dispatch

    with no_dispatch(), torch._C.DisableTorchFunction():
        return torch.promote_types(a, b)


def environment(platform: str, kernels: str | None = "auto", used: set | None = None) -> Any:
    """A fresh ``torchax.tensor.Environment`` with anychip's overrides for JAX ``platform``.

    ``used`` (a set) collects, at trace time, which attention lowering ran.
    """
    from torchax import tensor

    env = tensor.Environment()
    env.override_op_definition(torch.nn.functional.batch_norm, _batch_norm(env))
    env.override_op_definition(torch.promote_types, _promote_types)
    if kernels != "reference" and os.environ.get(ENV_VAR, "").strip() != "reference":
        install_jax_overrides(env, platform, include_sdpa=True, used=used if used is not None else set())
    return env
