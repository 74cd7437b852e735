"""RMSNorm, the specification (plain PyTorch).

    y = x * rsqrt(mean(x**2, dim=-1) + eps) * weight

x: [..., N] floating; weight: [N] floating (may be wider than x, e.g. fp32 master weights
under bf16 autocast). Computed in float32 (float64 stays float64); y has x's dtype.
Source: Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019); Llama's RMSNorm.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the last dim of ``x`` scaled by ``weight``; differentiable by torch autograd."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(compute)).to(x.dtype)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight), written out: a custom op's kernel runs below autograd and cannot call it.

    With xhat = x * rstd and g = weight * dy:  dx = rstd * (g - xhat * mean(g * xhat)),
    dweight = sum over rows of dy * xhat.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xf, dy = x.to(compute), grad.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    xhat = xf * rstd
    g = dy * weight.to(compute)
    dx = rstd * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    dw = (dy * xhat).reshape(-1, x.shape[-1]).sum(dim=0)
    return dx.to(x.dtype), dw.to(weight.dtype)
