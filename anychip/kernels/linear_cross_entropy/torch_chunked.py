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

from collections.abc import Iterator

import torch

from anychip.kernels.linear_cross_entropy import op_entry
from anychip.kernels.linear_cross_entropy.reference import loss_dtype, reduce_losses, row_scale, valid_rows


def row_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    """Slices of at most chunk_size rows covering [0, n): one [C, V] logits chunk each."""
    return (slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size))


def linear_cross_entropy_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    compute = loss_dtype(hidden.dtype)
    n = hidden.shape[0]
    valid, safe_targets = valid_rows(targets, ignore_index)
    lse = torch.empty(n, dtype=compute, device=hidden.device)
    target_logit = torch.empty(n, dtype=compute, device=hidden.device)
    for rows in row_chunks(n, chunk_size):
        logits = (hidden[rows] @ weight.T).to(compute)
        lse[rows] = torch.logsumexp(logits, dim=-1)
        target_logit[rows] = logits.gather(1, safe_targets[rows, None])[:, 0]
    losses = torch.where(valid, lse - target_logit, torch.zeros((), dtype=compute, device=hidden.device))
    return reduce_losses(losses, valid, reduction), lse


def linear_cross_entropy_backward(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, reduction: str, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    compute = loss_dtype(hidden.dtype)
    valid, safe_targets = valid_rows(targets, ignore_index)
    scale = row_scale(grad, valid, reduction, compute)
    dhidden = torch.empty_like(hidden)
    dweight = torch.zeros(weight.shape, dtype=compute, device=weight.device)
    for rows in row_chunks(hidden.shape[0], chunk_size):
        h = hidden[rows]
        probs = (h @ weight.T).to(compute).sub_(lse[rows, None]).exp_()
        probs.scatter_add_(1, safe_targets[rows, None], -valid[rows, None].to(compute))
        dlogits = probs.mul_(scale[rows, None]).to(hidden.dtype)
        dhidden[rows] = dlogits @ weight
        dweight += (dlogits.T @ h).to(compute)
    return dhidden, dweight.to(weight.dtype)


linear_cross_entropy = op_entry("torch_chunked")
