"""rms_norm: y = x * rsqrt(mean(x**2, -1) + eps) * weight (spec: ``reference.py``).

Public entry: ``rms_norm(x, weight, eps=1e-6, *, kernels="auto", backend=None)``.
Implementations (see ``anychip.kernels.table.TABLE``): reference, triton (CUDA), jax, pallas (TPU).
The custom op ``anychip::rms_norm(x, weight, eps, impl)`` carries the chosen implementation's
name so that one op serves every backend and torchax can map it to JAX.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from anychip.kernels.rms_norm import reference
from anychip.kernels.scope import resolve_backend
from anychip.kernels.selection import select_for_call, torch_module

OP = "rms_norm"


@torch.library.custom_op("anychip::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str) -> torch.Tensor:
    return torch_module(OP, impl).rms_norm_forward(x, weight, eps)


@rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("anychip::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch_module(OP, impl).rms_norm_backward(grad, x, weight, eps)


@rms_norm_backward_op.register_fake
def _(grad, x, weight, eps, impl):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, eps, impl = inputs
    # rstd is recomputed in backward (one reduction over a row the backward reads anyway),
    # so the op has a single output and torchax maps it to a single JAX function.
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.impl = eps, impl


def _backward(ctx: Any, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(grad.contiguous(), x, weight, ctx.eps, ctx.impl)
    return dx, dw, None, None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """One-line TypeError/ValueError for inputs no implementation accepts."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("rms_norm: x and weight must be tensors")
    if not x.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise TypeError(f"rms_norm: x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape [N] with N = x.shape[-1]; got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"rms_norm: eps must be a non-negative float, got {eps!r}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    kernels: str | None = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., N], weight [N] -> [..., N] in x's dtype.

    kernels: "auto" | "reference" | an implementation name (see anychip.kernels.selection);
    backend: a backend name; default the one ``anychip.kernels.kernel_scope`` set, else x's device.
    """
    check_inputs(x, weight, eps)
    impl = select_for_call(OP, resolve_backend(backend, x), kernels)
    if impl.direct:
        return reference.rms_norm(x, weight, float(eps))
    return rms_norm_op(x, weight, float(eps), impl.name)


def jax_overrides(platform: str) -> dict[Any, Callable[..., Any]]:
    """torchax overrides of the two ops for JAX ``platform`` ("cpu" | "gpu" | "tpu")."""
    from anychip.kernels.rms_norm import jax as jax_impl
    from anychip.kernels.rms_norm import pallas as pallas_impl

    modules = {"jax": jax_impl, "pallas": pallas_impl}
    interpret = platform == "cpu"  # Pallas on the CPU runs only in its interpreter

    def pick(impl: str):
        if impl not in modules:
            raise ValueError(f"rms_norm: {impl!r} is not a JAX implementation ({', '.join(modules)})")
        return modules[impl]

    def forward(x, weight, eps, impl):
        if impl == "pallas":
            return pallas_impl.rms_norm(x, weight, eps, interpret=interpret)
        return pick(impl).rms_norm(x, weight, eps)

    def backward(grad, x, weight, eps, impl):
        if impl == "pallas":
            return pallas_impl.rms_norm_backward(grad, x, weight, eps, interpret=interpret)
        return pick(impl).rms_norm_backward(grad, x, weight, eps)

    return {torch.ops.anychip.rms_norm.default: forward, torch.ops.anychip.rms_norm_backward.default: backward}
