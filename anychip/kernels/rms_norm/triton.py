"""RMSNorm in Triton (CUDA; CPU with TRITON_INTERPRET=1).

Forward, per row of x [M, N]:  rstd = rsqrt(sum(x**2)/N + eps);  y = x * rstd * w.
Backward, with xhat = x * rstd and g = w * dy:
    dx = rstd * (g - xhat * sum(g * xhat)/N)
    dw = sum over rows of dy * xhat
Each program handles BLOCK_M rows at once (many rows per program when N is small, so short
rows still fill a block). The backward runs a persistent grid: every program walks a slice of
rows, keeps its dw partial in registers and writes one [N] row; torch sums the partials. rstd
is recomputed in the backward instead of stored: the row is loaded anyway.
Source: Triton's layer-norm tutorial; Liger-Kernel's rms_norm.py (row-wise kernels,
per-program dw partials); Unsloth's fast RMSNorm. Uses only triton.language features present
in Triton 3.0 and later.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anychip.kernels.launch import check_triton_device, next_power_of_2, num_warps, program_count

# A row must fit in one block: 64K elements of fp32 is the most a program holds in registers.
MAX_N = 65536
# Rows per block are chosen to make blocks of about this many elements.
BLOCK_ELEMENTS = 4096


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, w_ptr, y_ptr, M, N, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr, M, N,
    stride_dy, stride_x, stride_dx, eps, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * N + cols, dw, mask=col_mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _blocks(N: int) -> tuple[int, int]:
    if N > MAX_N:
        raise ValueError(f"rms_norm/triton supports rows of at most {MAX_N} elements, got {N}")
    block_n = next_power_of_2(N)
    return max(1, min(64, BLOCK_ELEMENTS // block_n)), block_n


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_triton_device("rms_norm", x, weight)
    x2 = _rows(x)
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m, block_n = _blocks(N)
    if M > 0:
        _rms_norm_forward_kernel[(triton.cdiv(M, block_m),)](
            x2, weight.contiguous(), y, M, N, x2.stride(0), y.stride(0), eps,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m * block_n),
        )
    return y.view(x.shape)


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_device("rms_norm", grad, x, weight)
    x2, dy2 = _rows(x), _rows(grad)
    M, N = x2.shape
    block_m, block_n = _blocks(N)
    programs = max(1, min(triton.cdiv(M, block_m), program_count(x.device)))
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    programs = max(1, triton.cdiv(M, rows_per_program))
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dw_partial = torch.zeros((programs, N), dtype=torch.float32, device=x.device)
    if M > 0:
        _rms_norm_backward_kernel[(programs,)](
            dy2, x2, weight.contiguous(), dx, dw_partial, M, N,
            dy2.stride(0), x2.stride(0), dx.stride(0), eps, rows_per_program,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m * block_n),
        )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Differentiable RMSNorm through the ``anychip::rms_norm`` op with this implementation."""
    from anychip.kernels.rms_norm import rms_norm_op

    return rms_norm_op(x, weight, float(eps), "triton")
