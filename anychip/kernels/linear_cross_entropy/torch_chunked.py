"""LM head + cross-entropy in token chunks, in plain PyTorch: the logits are never whole.

For each chunk of C rows: logits_c = hidden_c @ weight.T  ([C, V], the only big buffer),
lse_c = logsumexp(logits_c), loss_c = lse_c - logits_c[target]. The forward keeps only lse
([N] floats). The backward recomputes logits_c and forms, in place,

    dlogits_c = (exp(logits_c - lse_c) - onehot(target)) * scale     (scale = dloss / count,
                                                                       0 on ignored rows)
    dhidden_c = dlogits_c @ weight;   dweight += dlogits_c.T @ hidden_c   (fp32 accumulator)

Cost: one extra [C,d]x[d,V] matmul per chunk (4 instead of 3); memory: C*V instead of N*V.
For GPT-2 small at 16x1024 tokens the fp32 logits alone would be 3.3 GB.
Source: the chunked-loss idea of Liger-Kernel's fused_linear_cross_entropy and of
"Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024).
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


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


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    compute = _compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.empty(n, dtype=compute, device=hidden.device)
    target_logit = torch.empty(n, dtype=compute, device=hidden.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        logits = (hidden[start:end] @ weight.T).to(compute)
        lse[start:end] = torch.logsumexp(logits, dim=-1)
        target_logit[start:end] = logits.gather(1, safe_targets[start:end, None])[:, 0]
    losses = torch.where(valid, lse - target_logit, torch.zeros((), dtype=compute, device=hidden.device))
    return reduce_losses(losses, valid, reduction), lse


def linear_cross_entropy_backward(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    compute = _compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    scale = row_scale(grad, valid, reduction, compute)
    dhidden = torch.empty_like(hidden)
    dweight = torch.zeros(weight.shape, dtype=compute, device=weight.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end]
        probs = (h @ weight.T).to(compute).sub_(lse[start:end, None]).exp_()
        probs.scatter_add_(1, safe_targets[start:end, None], -valid[start:end, None].to(compute))
        dlogits = probs.mul_(scale[start:end, None]).to(hidden.dtype)
        dhidden[start:end] = dlogits @ weight
        dweight += (dlogits.T @ h).to(compute)
    return dhidden, dweight.to(weight.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Differentiable chunked loss through the ``anychip::linear_cross_entropy`` op."""
    from anychip.kernels.linear_cross_entropy import linear_cross_entropy_op

    return linear_cross_entropy_op(hidden, weight, targets, ignore_index, reduction, chunk_size, "torch_chunked")[0]
