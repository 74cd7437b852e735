"""LM head + cross-entropy in token chunks: cuBLAS matmuls, Triton for the softmax parts.

Same algorithm as ``torch_chunked.py`` (logits only ever [C, V], recomputed in backward), with
the elementwise work over each [C, V] chunk done in one pass each by Triton:

forward, one program per row i:    lse_i = log(sum_j exp(z_ij))  (online max/sum over blocks
                                    of BLOCK_V columns), loss_i = lse_i - z_i[t_i], 0 if ignored
backward, one program per row i:   dz_ij = (exp(z_ij - lse_i) - [j == t_i]) * scale_i,
                                    written over z in place, in the matmul dtype

The logits chunk stays in the inputs' dtype (bf16 for a bf16 model) and is read once per
pass; the torch version spends an fp32 copy, an exp, a scatter and a multiply instead.
Source: Liger-Kernel's fused_linear_cross_entropy (chunking, gradient in place of the logits)
and the online softmax of Milakov & Gimelshein (2018). Triton 3.0+ features only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anychip.kernels.launch import check_triton_device, next_power_of_2, num_warps
from anychip.kernels.linear_cross_entropy import op_entry
from anychip.kernels.linear_cross_entropy.reference import reduce_losses, row_scale
from anychip.kernels.linear_cross_entropy.torch_chunked import row_chunks

# Columns per block of the vocabulary loop. Tests lower it to run several blocks on a small V.
MAX_BLOCK_V = 8192


@triton.jit
def _cross_entropy_forward_kernel(
    logits_ptr, targets_ptr, lse_ptr, loss_ptr, V, stride_row, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # Out-of-range targets are not checked (that would need a device sync); they read 0.
    in_range = valid & (target >= 0) & (target < V)
    z_target = tl.load(base + tl.where(in_range, target, 0), mask=in_range, other=0.0).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))


@triton.jit
def _cross_entropy_backward_kernel(
    logits_ptr, grad_ptr, targets_ptr, lse_ptr, scale_ptr, V, stride_logits, stride_grad,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)  # 0 on ignored rows, so they get a zero gradient
    target = tl.load(targets_ptr + row)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        z = tl.load(logits_ptr + row * stride_logits + idx, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(z - lse)
        p = tl.where(idx == target, p - 1.0, p)
        tl.store(grad_ptr + row * stride_grad + idx, (p * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _vocab_and_block(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(V, BLOCK_V), once Triton is known to run on these tensors."""
    check_triton_device("linear_cross_entropy", hidden, weight, targets)
    V = weight.shape[0]
    return V, min(next_power_of_2(V), MAX_BLOCK_V)


def linear_cross_entropy_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    V, block_v = _vocab_and_block(hidden, weight, targets)
    n = hidden.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    targets = targets.contiguous()
    for rows in row_chunks(n, chunk_size):
        logits = hidden[rows] @ weight.T
        _cross_entropy_forward_kernel[(logits.shape[0],)](
            logits, targets[rows], lse[rows], losses[rows], V, logits.stride(0),
            ignore_index, BLOCK_V=block_v, num_warps=num_warps(block_v),
        )
    return reduce_losses(losses, targets != ignore_index, reduction), lse


def linear_cross_entropy_backward(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    ignore_index: int, reduction: str, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    V, block_v = _vocab_and_block(hidden, weight, targets)
    targets = targets.contiguous()
    scale = row_scale(grad, targets != ignore_index, reduction, torch.float32).contiguous()
    lse = lse.contiguous()
    dhidden = torch.empty_like(hidden)
    # fp32 accumulator over chunks; each chunk's product is rounded to the matmul dtype first.
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for rows in row_chunks(hidden.shape[0], chunk_size):
        h = hidden[rows]
        logits = h @ weight.T
        _cross_entropy_backward_kernel[(logits.shape[0],)](
            logits, logits, targets[rows], lse[rows], scale[rows], V,
            logits.stride(0), logits.stride(0), BLOCK_V=block_v, num_warps=num_warps(block_v),
        )
        dhidden[rows] = logits @ weight
        dweight += logits.T @ h
    return dhidden, dweight.to(weight.dtype)


linear_cross_entropy = op_entry("triton")
