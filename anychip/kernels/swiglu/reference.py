"""SwiGLU activation, the specification (plain PyTorch).

    y = silu(gate) * up = gate * sigmoid(gate) * up

gate, up: same shape and floating dtype; computed in float32 (float64 stays float64), y in the
inputs' dtype. Source: Shazeer, "GLU Variants Improve Transformer" (2020); Llama's MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    compute = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu(gate, up)


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup), written out (a custom op's kernel runs below autograd).

    With s = sigmoid(gate): dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * gate * s.
    """
    compute = torch.promote_types(gate.dtype, torch.float32)
    g, u, dy = gate.to(compute), up.to(compute), grad.to(compute)
    s = torch.sigmoid(g)
    return (dy * u * s * (1 + g * (1 - s))).to(gate.dtype), (dy * g * s).to(up.dtype)
