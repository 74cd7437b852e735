"""linear_cross_entropy: LM head + cross-entropy without materialising the logits.

    loss = cross_entropy((hidden @ weight.T).float(), targets, ignore_index, reduction)

Spec: ``reference.py``. Implementations: reference (full logits), torch_chunked (CPU/CUDA),
triton (CUDA), jax (chunked custom_vjp). Public entry:
``linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", *,
chunk_size=None, kernels="auto", backend=None)``. The custom op
``anychip::linear_cross_entropy(hidden[N,d], weight[V,d], targets[N], ignore_index, reduction,
chunk_size, impl) -> (loss, lse[N])`` returns the per-row logsumexp too: the backward needs it
and a custom op can save only its inputs and outputs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from anychip.kernels.launch import next_power_of_2
from anychip.kernels.linear_cross_entropy import reference
from anychip.kernels.scope import resolve_backend
from anychip.kernels.selection import select_for_call, torch_module

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


@torch.library.custom_op("anychip::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
    chunk_size: int, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch_module(OP, impl).linear_cross_entropy_forward(
        hidden, weight, targets, ignore_index, reduction, chunk_size
    )


@linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, reduction, chunk_size, impl):
    dtype = reference.loss_dtype(hidden.dtype)
    shape = (hidden.shape[0],) if reduction == "none" else ()
    return hidden.new_empty(shape, dtype=dtype), hidden.new_empty((hidden.shape[0],), dtype=dtype)


@torch.library.custom_op("anychip::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, reduction: str, chunk_size: int, impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch_module(OP, impl).linear_cross_entropy_backward(
        grad, hidden, weight, targets, lse, ignore_index, reduction, chunk_size
    )


@linear_cross_entropy_backward_op.register_fake
def _(grad, hidden, weight, targets, lse, ignore_index, reduction, chunk_size, impl):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    hidden, weight, targets, ignore_index, reduction, chunk_size, impl = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.args = (ignore_index, reduction, chunk_size, impl)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, grad_loss: torch.Tensor, grad_lse: torch.Tensor | None):
    hidden, weight, targets, lse = ctx.saved_tensors
    dhidden, dweight = linear_cross_entropy_backward_op(grad_loss, hidden, weight, targets, lse, *ctx.args)
    return dhidden, dweight, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def op_entry(impl: str) -> Callable[..., torch.Tensor]:
    """The public ``linear_cross_entropy`` of an implementation file: its loss through the op."""

    def linear_cross_entropy(
        hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
        reduction: str = "mean", chunk_size: int = 1024,
    ) -> torch.Tensor:
        """Differentiable chunked loss through the ``anychip::linear_cross_entropy`` op."""
        return linear_cross_entropy_op(hidden, weight, targets, ignore_index, reduction, chunk_size, impl)[0]

    return linear_cross_entropy


def default_chunk_size(n: int, vocab: int, dim: int) -> int:
    """Rows per chunk: a [C, V] logits chunk about as large as hidden itself (Liger's rule),
    but at least 256 rows so each chunk's matmul still fills a GPU."""
    chunk = next_power_of_2(-(-n // max(1, -(-vocab // max(dim, 1)))))
    return max(1, min(n, max(256, chunk)))


def _autocast(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A custom op is opaque to autocast. An unfused head under autocast runs its matmul in the
    # autocast dtype, so cast both operands the same way (fp32 master weights, bf16 compute).
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return hidden, weight  # check_inputs names the problem
    kind = hidden.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
) -> None:
    """One-line TypeError/ValueError for inputs no implementation accepts."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a tensor, got {type(t).__name__}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise TypeError(
            f"linear_cross_entropy: hidden and weight need the same floating dtype, got {hidden.dtype} "
            f"and {weight.dtype}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_cross_entropy: targets must be int64 or int32, got {targets.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: need hidden [..., d] and weight [V, d]; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy: targets shape {tuple(targets.shape)} must equal hidden's leading dims "
            f"{tuple(hidden.shape[:-1])}"
        )
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"linear_cross_entropy: inputs on different devices: hidden {hidden.device}, weight {weight.device}, "
            f"targets {targets.device}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"linear_cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    chunk_size: int | None = None,
    kernels: str | None = "auto",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` (float32 result).

    hidden [..., d], weight [V, d] (an nn.Linear(d, V, bias=False) weight), targets [...]
    integer. reduction "mean" (over non-ignored rows), "sum" or "none" (shape of targets).
    chunk_size: rows per chunk for the chunked implementations (default: ``default_chunk_size``).
    Targets outside [0, V) other than ignore_index are not checked (it would need a sync).
    """
    hidden, weight = _autocast(hidden, weight)
    check_inputs(hidden, weight, targets, ignore_index, reduction)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    leading = targets.shape
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets2 = targets.reshape(-1).long()
    impl = select_for_call(OP, resolve_backend(backend, hidden), kernels)
    if impl.direct:
        loss = reference.linear_cross_entropy(hidden2, weight, targets2, ignore_index, reduction)
    else:
        n, vocab, dim = hidden2.shape[0], weight.shape[0], weight.shape[1]
        chunk = chunk_size or default_chunk_size(n, vocab, dim)
        loss = linear_cross_entropy_op(hidden2, weight, targets2, ignore_index, reduction, chunk, impl.name)[0]
    return loss.reshape(leading) if reduction == "none" else loss


def jax_overrides(platform: str) -> dict[Any, Callable[..., Any]]:
    """torchax overrides of the two ops (the same chunked JAX code on every platform)."""
    from anychip.kernels.linear_cross_entropy import jax as jax_impl

    def check(impl: str) -> None:
        if impl != "jax":
            raise ValueError(f"linear_cross_entropy: {impl!r} is not a JAX implementation (jax)")

    def forward(hidden, weight, targets, ignore_index, reduction, chunk_size, impl):
        check(impl)
        return jax_impl.linear_cross_entropy_forward(hidden, weight, targets, ignore_index, reduction, chunk_size)

    def backward(grad, hidden, weight, targets, lse, ignore_index, reduction, chunk_size, impl):
        check(impl)
        return jax_impl.linear_cross_entropy_backward(
            grad, hidden, weight, targets, lse, ignore_index, reduction, chunk_size
        )

    return {
        torch.ops.anychip.linear_cross_entropy.default: forward,
        torch.ops.anychip.linear_cross_entropy_backward.default: backward,
    }
