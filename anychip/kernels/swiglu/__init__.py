"""swiglu: y = silu(gate) * up (spec: ``reference.py``).

Public entry: ``swiglu(gate, up, *, kernels="auto", backend=None)``. Implementations:
reference, triton (CUDA), jax. Custom op: ``anychip::swiglu(gate, up, impl)``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from anychip.kernels.swiglu import reference
from anychip.kernels.scope import resolve_backend
from anychip.kernels.selection import select_for_call, torch_module

OP = "swiglu"


@torch.library.custom_op("anychip::swiglu", mutates_args=())
def swiglu_op(gate: torch.Tensor, up: torch.Tensor, impl: str) -> torch.Tensor:
    return torch_module(OP, impl).swiglu_forward(gate, up)


@swiglu_op.register_fake
def _(gate: torch.Tensor, up: torch.Tensor, impl: str) -> torch.Tensor:
    return torch.empty_like(gate)


@torch.library.custom_op("anychip::swiglu_backward", mutates_args=())
def swiglu_backward_op(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch_module(OP, impl).swiglu_backward(grad, gate, up)


@swiglu_backward_op.register_fake
def _(grad, gate, up, impl):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    gate, up, impl = inputs
    ctx.save_for_backward(gate, up)
    ctx.impl = impl


def _backward(ctx: Any, grad: torch.Tensor):
    gate, up = ctx.saved_tensors
    dgate, dup = swiglu_backward_op(grad, gate, up, ctx.impl)
    return dgate, dup, None


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    """One-line TypeError/ValueError for inputs no implementation accepts."""
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError("swiglu: gate and up must be tensors")
    if not gate.dtype.is_floating_point or gate.dtype != up.dtype:
        raise TypeError(f"swiglu: gate and up need the same floating dtype, got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate is on {gate.device} but up is on {up.device}")


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, *, kernels: str | None = "auto", backend: str | None = None
) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of one shape and dtype."""
    check_inputs(gate, up)
    impl = select_for_call(OP, resolve_backend(backend, gate), kernels)
    if impl.direct:
        return reference.swiglu(gate, up)
    return swiglu_op(gate, up, impl.name)


def jax_overrides(platform: str) -> dict[Any, Callable[..., Any]]:
    """torchax overrides of the two ops."""
    from anychip.kernels.swiglu import jax as jax_impl

    def check(impl: str) -> None:
        if impl != "jax":
            raise ValueError(f"swiglu: {impl!r} is not a JAX implementation (jax)")

    def forward(gate, up, impl):
        check(impl)
        return jax_impl.swiglu(gate, up)

    def backward(grad, gate, up, impl):
        check(impl)
        return jax_impl.swiglu_backward(grad, gate, up)

    return {torch.ops.anychip.swiglu.default: forward, torch.ops.anychip.swiglu_backward.default: backward}
