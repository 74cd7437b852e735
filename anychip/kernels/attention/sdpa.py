"""Attention through torch's ``scaled_dot_product_attention`` (flash / memory-efficient / cuDNN
on CUDA, a fused CPU kernel on the CPU); math and layout as in ``reference.py``.

The public entry calls SDPA directly (``direct=True`` in the table): it is already an op that
``torch.compile`` keeps in the graph and whose backward reuses the forward's logsumexp. Going
through the ``anychip::attention`` custom op instead (``attention_forward/backward`` below)
would lose SDPA's fused backward, since SDPA's public API does not return the logsumexp a
custom op would have to save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anychip.kernels.attention import reference


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def attention_forward(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    return attention(q, k, v, causal, scale)


def attention_backward(grad, q, k, v, causal: bool, scale: float | None):
    """(dq, dk, dv) by the reference's written-out math: a custom op's kernel runs below
    autograd, so it cannot reach SDPA's backward (only the direct call above does)."""
    return reference.attention_backward(grad, q, k, v, causal, scale)
