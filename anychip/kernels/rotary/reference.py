"""Rotary position embedding, the specification (plain PyTorch), rotate-half convention.

Layout: q [B, Hq, T, D], k [B, Hk, T, D] (Hq may differ from Hk), cos and sin [T, D/2]
(one angle per position and frequency, not duplicated). With x1 = x[..., :D/2] and
x2 = x[..., D/2:]:

    out[..., :D/2] = x1 * cos - x2 * sin
    out[..., D/2:] = x2 * cos + x1 * sin

which equals Llama's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)``. Computed in
float32 (float64 stays float64), outputs in q's / k's dtype. cos and sin are constants: they
must not require grad. Source: Su et al., "RoFormer" (2021); the Llama/GPT-NeoX layout.
"""

from __future__ import annotations

import torch


def rotary_tables(
    seq_len: int,
    head_dim: int,
    base: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, head_dim/2] for angles t * base**(-2i/head_dim)."""
    if head_dim % 2:
        raise ValueError(f"rotary: head_dim must be even, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)
    c, s = cos.to(compute), sin.to(compute)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rotary_forward(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary(q, k, cos, sin)


def rotary_backward(
    grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk): the rotation is orthogonal, so the backward rotates by -angle."""
    return _rotate(grad_q, cos, -sin), _rotate(grad_k, cos, -sin)
