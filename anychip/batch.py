"""Batches, as every engine sees them: their tensor leaves, equal splits, token counts, and
the user's loss function called and checked."""

from __future__ import annotations

from typing import Any

from anychip.errors import InvalidArgumentError, LossFunctionError, NonFiniteLossError


def map_tensors(fn, tree):
    """Apply ``fn`` to every tensor in a batch made of tensors, tuples, lists and dicts."""
    import torch

    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        out = [map_tensors(fn, v) for v in tree]
        return type(tree)(*out) if hasattr(tree, "_fields") else type(tree)(out)
    return tree

def batch_leaves(batch, path: str = "batch") -> list[tuple[str, Any]]:
    """Every leaf of a batch with its path; InvalidArgumentError on anything but tensors/containers."""
    import torch

    if isinstance(batch, torch.Tensor):
        return [(path, batch)]
    if isinstance(batch, dict):
        return [leaf for k, v in batch.items() for leaf in batch_leaves(v, f"{path}[{k!r}]")]
    if isinstance(batch, (tuple, list)):
        return [leaf for i, v in enumerate(batch) for leaf in batch_leaves(v, f"{path}[{i}]")]
    hint = " (convert it with torch.from_numpy)" if type(batch).__module__ == "numpy" else ""
    raise InvalidArgumentError(
        f"{path} is a {type(batch).__module__}.{type(batch).__name__}; a batch must be a tensor or a "
        f"tuple/list/dict of tensors{hint}"
    )


def check_batch(batch, accumulate: int, processes: int = 1) -> list[tuple[str, Any]]:
    """The batch's leaves, once every leaf holds samples and splits into ``processes`` x
    ``accumulate`` equal parts (``processes`` > 1: a global batch each rank takes its slice of)."""
    leaves = batch_leaves(batch)
    if not leaves:
        raise InvalidArgumentError("the batch holds no tensor; pass a tensor or a tuple/list/dict of tensors")
    for path, t in leaves:
        # A mean over no samples is NaN: that would be reported as a non-finite loss, far from its cause.
        if t.ndim and t.shape[0] == 0:
            raise InvalidArgumentError(f"{path} has shape {tuple(t.shape)}: no samples; pass a batch of at least one "
                                       "(skip an empty last batch, e.g. DataLoader(..., drop_last=True))")
    parts = accumulate * processes
    if parts > 1:
        for path, t in leaves:
            if t.ndim == 0 or t.shape[0] % parts:
                size = tuple(t.shape)[:1] or "()"
                if processes > 1:
                    raise InvalidArgumentError(
                        f"{path} has leading size {size}, which {processes} processes x accumulate={accumulate} cannot "
                        f"split into equal parts; use a global batch size divisible by {parts} (world size x accumulate)"
                    )
                raise InvalidArgumentError(
                    f"{path} has leading size {size}, which accumulate={accumulate} "
                    f"cannot split into equal micro-batches; use a batch size divisible by {accumulate}"
                )
    return leaves


def split_batch(batch, parts: int) -> list:
    """``parts`` micro-batches, each leaf chunked along dim 0."""
    import torch

    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        pieces = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: pieces[k][i] for k in batch} for i in range(parts)]
    pieces = [split_batch(v, parts) for v in batch]
    return [type(batch)(p[i] for p in pieces) for i in range(parts)]


def count_tokens(leaves: list[tuple[str, Any]]) -> int:
    """Tokens in a batch: the elements of the first integer tensor (token ids), else the
    leading size of the first tensor (samples)."""
    import torch

    for _, t in leaves:
        if t.ndim and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            return t.numel()
    return int(leaves[0][1].shape[0]) if leaves[0][1].ndim else 1


def call_loss(loss_fn, model, batch):
    """Run the user's loss function; its failures become one clear LossFunctionError."""
    try:
        loss = loss_fn(model, batch)
    except (LossFunctionError, NonFiniteLossError):
        raise
    except Exception as exc:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LossFunctionError(f"loss_fn {name!r} raised {type(exc).__name__}: {first}") from exc
    return loss


def check_loss(loss, needs_grad: bool = False) -> None:
    """A loss must be a 0-dim floating torch tensor (shape, dtype and, with ``needs_grad``, a
    path back to the parameters; no device sync). ``needs_grad`` is for eager torch, where
    backward() would fail on it; a traced (JAX) loss carries no autograd flags."""
    import torch

    if not isinstance(loss, torch.Tensor):
        kind = type(loss)
        name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
        raise LossFunctionError(f"loss_fn must return a scalar tensor, got {name}; compute the loss from the model's output "
                                "with torch ops (no .item(), float() or NumPy), e.g. F.mse_loss(model(x), y)")
    if loss.shape != ():
        raise LossFunctionError(
            f"loss_fn must return a scalar tensor (shape ()), got shape {tuple(loss.shape)}; reduce it, e.g. loss.mean()"
        )
    if not loss.is_floating_point():
        raise LossFunctionError(f"loss_fn must return a floating-point scalar, got dtype {loss.dtype}")
    if needs_grad and not loss.requires_grad:
        raise no_gradient_path()


def no_gradient_path() -> LossFunctionError:
    """The one message for a loss that backward cannot reach the trainable parameters from."""
    return LossFunctionError("loss_fn returned a loss that does not require grad: it has no path back to the model's "
                             "trainable parameters (computed under torch.no_grad(), detached, or rebuilt from a number); "
                             "compute it from model(batch) with torch ops")
