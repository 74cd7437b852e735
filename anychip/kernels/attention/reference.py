"""Scaled dot-product attention, the specification (plain PyTorch math, materialised scores).

    scores = q @ k.T * scale            (scale = 1/sqrt(D) unless given)
    scores[i, j] = -inf where causal and j > i      (top-left aligned, as torch and JAX do)
    out = softmax(scores) @ v

q [B, Hq, T, D], k and v [B, Hk, S, D] with Hq a multiple of Hk (grouped-query attention:
query head h reads key/value head h // (Hq/Hk)). Computed in float32 (float64 stays
float64), out [B, Hq, T, D] in q's dtype. Source: Vaswani et al. (2017); Ainslie et al., "GQA" (2023).
"""

from __future__ import annotations

import math

import torch


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None
) -> torch.Tensor:
    compute = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    if causal:
        T, S = scores.shape[-2:]
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(compute)).to(q.dtype)


def attention_forward(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    return attention(q, k, v, causal, scale)


def attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), written out (a custom op's kernel runs below autograd).

    P = softmax(S), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)),
    dQ = dS K * scale, dK = dS^T Q * scale; GQA sums dK, dV over each key head's query heads.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    B, Hq, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    groups = Hq // Hk
    qf, do = q.to(compute), grad.to(compute)
    kf, vf = k.to(compute), v.to(compute)
    if groups > 1:
        kf, vf = kf.repeat_interleave(groups, dim=1), vf.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(dim=-1)
    dv = probs.transpose(-1, -2) @ do
    dprobs = do @ vf.transpose(-1, -2)
    dscores = probs * (dprobs - (dprobs * probs).sum(dim=-1, keepdim=True))
    dq = (dscores @ kf) * scale
    dk = (dscores.transpose(-1, -2) @ qf) * scale
    if groups > 1:
        dk = dk.reshape(B, Hk, groups, S, D).sum(dim=2)
        dv = dv.reshape(B, Hk, groups, S, D).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
