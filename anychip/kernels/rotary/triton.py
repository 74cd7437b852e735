"""Rotary embedding in Triton (CUDA; CPU with TRITON_INTERPRET=1), rotate-half convention.

x [B, H, T, D] with any strides over B, H, T (a transposed [B, T, H, D] view needs no copy;
the last dim must be contiguous), cos/sin [T, D/2]. Each program rotates BLOCK_R rows
(a row is one (b, h, t)): with x1 = x[:D/2], x2 = x[D/2:],
    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin
The backward is the same kernel with sin negated (the rotation is orthogonal). Outputs are
contiguous [B, H, T, D]. Source: Liger-Kernel's rope.py; the Llama/GPT-NeoX rotate-half
layout. Triton 3.0+ features only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anychip.kernels.launch import check_triton_device, next_power_of_2, num_warps

BLOCK_ELEMENTS = 4096


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, rows_total, H, T, HALF,
    stride_b, stride_h, stride_t, stride_cos, stride_sin,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (rows < rows_total)[:, None] & (cols < HALF)[None, :]
    t = rows % T
    bh = rows // T
    x_row = (bh // H) * stride_b + (bh % H) * stride_h + t * stride_t
    x1 = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row[:, None] + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t[:, None] * stride_cos + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t[:, None] * stride_sin + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s = -s
    out_row = rows * (2 * HALF)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + out_row[:, None] + cols[None, :], (x1 * c - x2 * s).to(dtype), mask=mask)
    tl.store(out_ptr + out_row[:, None] + HALF + cols[None, :], (x2 * c + x1 * s).to(dtype), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    half = D // 2
    out = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    rows = B * H * T
    block_half = next_power_of_2(half)
    block_r = max(1, min(64, BLOCK_ELEMENTS // block_half))
    if rows:
        _rotary_kernel[(triton.cdiv(rows, block_r),)](
            x, cos, sin, out, rows, H, T, half,
            x.stride(0), x.stride(1), x.stride(2), cos.stride(0), sin.stride(0),
            BACKWARD=backward, BLOCK_R=block_r, BLOCK_HALF=block_half,
            num_warps=num_warps(block_r * block_half),
        )
    return out


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (cos if cos.stride(-1) == 1 else cos.contiguous()), (sin if sin.stride(-1) == 1 else sin.contiguous())


def rotary_forward(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_device("rotary", q, k, cos, sin)
    cos, sin = _tables(cos, sin)
    return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)


def rotary_backward(grad_q, grad_k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_device("rotary", grad_q, grad_k, cos, sin)
    cos, sin = _tables(cos, sin)
    return _rotate(grad_q, cos, sin, True), _rotate(grad_k, cos, sin, True)


def rotary(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable rotary embedding through the ``anychip::rotary`` op with this implementation."""
    from anychip.kernels.rotary import rotary_op

    return rotary_op(q, k, cos, sin, "triton")
