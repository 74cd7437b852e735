"""rotary: rotary position embedding of q and k, rotate-half convention (spec: ``reference.py``).

Layout: q [B, Hq, T, D], k [B, Hk, T, D], cos/sin [T, D/2] (``reference.rotary_tables``).
Public entry: ``rotary(q, k, cos, sin, *, kernels="auto", backend=None) -> (q_rot, k_rot)``.
Implementations: reference, triton (CUDA), jax. Custom op:
``anychip::rotary(q, k, cos, sin, impl) -> (q_rot, k_rot)``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from anychip.kernels.rotary import reference
from anychip.kernels.rotary.reference import rotary_tables  # noqa: F401  (public: anychip.kernels.rotary.rotary_tables)
from anychip.kernels.scope import resolve_backend
from anychip.kernels.selection import select_for_call, torch_module

OP = "rotary"


@torch.library.custom_op("anychip::rotary", mutates_args=())
def rotary_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch_module(OP, impl).rotary_forward(q, k, cos, sin)


@rotary_op.register_fake
def _(q, k, cos, sin, impl):
    # Implementations return contiguous outputs whatever the input strides.
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("anychip::rotary_backward", mutates_args=())
def rotary_backward_op(
    grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch_module(OP, impl).rotary_backward(grad_q, grad_k, cos, sin)


@rotary_backward_op.register_fake
def _(grad_q, grad_k, cos, sin, impl):
    return grad_q.new_empty(grad_q.shape), grad_k.new_empty(grad_k.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, cos, sin, impl = inputs
    ctx.save_for_backward(cos, sin)
    ctx.impl = impl
    ctx.shapes = ((q.shape, q.dtype, q.device), (k.shape, k.dtype, k.device))


def _backward(ctx: Any, grad_q: torch.Tensor | None, grad_k: torch.Tensor | None):
    cos, sin = ctx.saved_tensors
    (q_shape, q_dtype, device), (k_shape, k_dtype, _) = ctx.shapes
    # An output that did not reach the loss has no gradient (None); it contributes zeros.
    if grad_q is None:
        grad_q = torch.zeros(q_shape, dtype=q_dtype, device=device)
    if grad_k is None:
        grad_k = torch.zeros(k_shape, dtype=k_dtype, device=device)
    dq, dk = rotary_backward_op(grad_q, grad_k, cos, sin, ctx.impl)
    return dq, dk, None, None, None


rotary_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """One-line TypeError/ValueError for inputs no implementation accepts."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rotary: {name} must be a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"rotary: {name} must be floating point, got {t.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rotary: q and k must be [B, H, T, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"rotary: k {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and D")
    if D % 2:
        raise ValueError(f"rotary: head dim D must be even, got {D}")
    if tuple(cos.shape) != (T, D // 2) or tuple(sin.shape) != (T, D // 2):
        raise ValueError(
            f"rotary: cos and sin must be [T, D/2] = [{T}, {D // 2}]; got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError(
            f"rotary: inputs on different devices: q {q.device}, k {k.device}, cos {cos.device}, sin {sin.device}"
        )
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rotary: cos and sin are constants; pass them detached (requires_grad=False)")


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    kernels: str | None = "auto",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by cos/sin [T, D/2]; returns (q_rot, k_rot)."""
    check_inputs(q, k, cos, sin)
    impl = select_for_call(OP, resolve_backend(backend, q), kernels)
    if impl.direct:
        return reference.rotary(q, k, cos, sin)
    return rotary_op(q, k, cos, sin, impl.name)


def jax_overrides(platform: str) -> dict[Any, Callable[..., Any]]:
    """torchax overrides of the two ops."""
    from anychip.kernels.rotary import jax as jax_impl

    def check(impl: str) -> None:
        if impl != "jax":
            raise ValueError(f"rotary: {impl!r} is not a JAX implementation (jax)")

    def forward(q, k, cos, sin, impl):
        check(impl)
        return jax_impl.rotary(q, k, cos, sin)

    def backward(grad_q, grad_k, cos, sin, impl):
        check(impl)
        return jax_impl.rotary_backward(grad_q, grad_k, cos, sin)

    return {torch.ops.anychip.rotary.default: forward, torch.ops.anychip.rotary_backward.default: backward}
