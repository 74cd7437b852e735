"""LM head + cross-entropy, the specification (plain PyTorch; materialises all logits).

    logits = hidden @ weight.T          (in the inputs' dtype, as an unfused bf16 head does)
    loss_i = logsumexp(logits_i) - logits_i[targets_i]   (in float32; 0 where ignored)
    loss   = mean over non-ignored rows | sum | per row ("none")

hidden: [N, d]; weight: [V, d]; targets: [N] integer in [0, V) or ignore_index.
Returns float32 (float64 for float64 inputs). Same as
``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=..., reduction=...)``.
The row rules below (loss dtype, ignored rows, reductions, per-row gradient scale) are the
spec the chunked implementations import, so every implementation applies the same ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the losses, lse and softmax: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def valid_rows(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows not ignored, targets with ignored rows pointing at class 0 so they index safely)."""
    valid = targets != ignore_index
    return valid, torch.where(valid, targets, 0)


def reduce_losses(losses: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses (0 where ignored) -> the requested reduction, as F.cross_entropy does."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum()  # all ignored -> 0/0 = nan, like F.cross_entropy


def row_scale(grad: torch.Tensor, valid: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d loss_i for every row: the factor each row's softmax gradient is scaled by."""
    grad = grad.to(dtype)
    if reduction == "none":
        scale = grad
    elif reduction == "sum":
        scale = grad.expand(valid.shape)
    else:
        scale = (grad / valid.sum()).expand(valid.shape)
    return torch.where(valid, scale, torch.zeros((), dtype=dtype, device=valid.device))


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (hidden @ weight.T).to(loss_dtype(hidden.dtype))


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    return F.cross_entropy(_logits(hidden, weight), targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logsumexp per row); chunk_size is ignored: the reference is unchunked."""
    logits = _logits(hidden, weight)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    return loss, torch.logsumexp(logits, dim=-1)


def linear_cross_entropy_backward(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, reduction: str, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dhidden, dweight), written out (a custom op's kernel runs below autograd).

    dlogits_i = (softmax(logits_i) - onehot(t_i)) * dloss/dloss_i, 0 on ignored rows, cast to
    the inputs' dtype as autograd through ``.float()`` does; dhidden = dlogits @ weight,
    dweight = dlogits.T @ hidden.
    """
    logits = _logits(hidden, weight)
    valid, safe_targets = valid_rows(targets, ignore_index)
    scale = row_scale(grad, valid, reduction, logits.dtype)
    probs = torch.exp(logits - lse[:, None].to(logits.dtype))
    onehot = F.one_hot(safe_targets, weight.shape[0]).to(logits.dtype) * valid[:, None]
    dlogits = ((probs - onehot) * scale[:, None]).to(hidden.dtype)
    return dlogits @ weight, dlogits.T @ hidden
