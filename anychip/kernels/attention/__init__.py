"""attention: softmax(q k^T * scale [+ causal mask]) v (spec: ``reference.py``).

Layout: q [B, Hq, T, D], k/v [B, Hk, S, D], Hq a multiple of Hk; out [B, Hq, T, D].
Public entry: ``attention(q, k, v, causal=True, scale=None, *, kernels="auto", backend=None)``.
Implementations: reference (math), sdpa (torch's flash/efficient SDPA, called directly),
jax (``jax.nn.dot_product_attention``, cuDNN on GPU). The custom op
``anychip::attention(q, k, v, causal, scale, impl)`` is how the JAX implementation is reached
through torchax; its torch kernel serves the torch implementations when called directly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from anychip.kernels.attention import reference, sdpa
from anychip.kernels.scope import resolve_backend
from anychip.kernels.selection import select_for_call, torch_module

OP = "attention"
# Implementations the public entry calls as plain torch code (Impl.direct in the table).
_DIRECT = {"reference": reference.attention, "sdpa": sdpa.attention}


@torch.library.custom_op("anychip::attention", mutates_args=())
def attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None, impl: str
) -> torch.Tensor:
    return torch_module(OP, impl).attention_forward(q, k, v, causal, scale).contiguous()


@attention_op.register_fake
def _(q, k, v, causal, scale, impl):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@torch.library.custom_op("anychip::attention_backward", mutates_args=())
def attention_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch_module(OP, impl).attention_backward(grad, q, k, v, causal, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward_op.register_fake
def _(grad, q, k, v, causal, scale, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    q, k, v, causal, scale, impl = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (causal, scale, impl)


def _backward(ctx: Any, grad: torch.Tensor):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad, q, k, v, *ctx.args)
    return dq, dk, dv, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    """One-line TypeError/ValueError for inputs no implementation accepts."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
    if not q.dtype.is_floating_point or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v need one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"attention: need k = v = [B, Hk, S, D] with q's B and D; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: inputs on different devices: q {q.device}, k {k.device}, v {v.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    kernels: str | None = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over k, v [B, Hk, S, D]; causal mask top-left aligned."""
    check_inputs(q, k, v, scale)
    scale = None if scale is None else float(scale)
    impl = select_for_call(OP, resolve_backend(backend, q), kernels)
    if impl.direct:
        return _DIRECT[impl.name](q, k, v, bool(causal), scale)
    return attention_op(q, k, v, bool(causal), scale, impl.name)


def jax_overrides(platform: str) -> dict[Any, Callable[..., Any]]:
    """torchax overrides of the two ops: cuDNN flash attention on GPU where it applies."""
    from anychip.kernels.attention import jax as jax_impl

    def check(impl: str) -> None:
        if impl != "jax":
            raise ValueError(f"attention: {impl!r} is not a JAX implementation (jax)")

    def forward(q, k, v, causal, scale, impl):
        check(impl)
        return jax_impl.attention_forward(q, k, v, causal, scale, platform=platform)

    def backward(grad, q, k, v, causal, scale, impl):
        check(impl)
        return jax_impl.attention_backward(grad, q, k, v, causal, scale, platform=platform)

    return {torch.ops.anychip.attention.default: forward, torch.ops.anychip.attention_backward.default: backward}
