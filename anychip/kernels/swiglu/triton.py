"""SwiGLU in Triton (CUDA; CPU with TRITON_INTERPRET=1), elementwise over the flattened inputs.

forward:   y  = g * s * u,                     s = sigmoid(g), in float32
backward:  dg = dy * u * s * (1 + g * (1 - s)),  du = dy * g * s
One read of each input and one write of each output per direction; no activation is stored
beyond gate and up. Source: Liger-Kernel's swiglu.py; Unsloth's SwiGLU kernels.
Triton 3.0+ features only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anychip.kernels.launch import check_triton_device

BLOCK = 1024


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, y_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dgate = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dgate_ptr + offsets, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_triton_device("swiglu", gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    numel = gate.numel()
    if numel:
        _swiglu_forward_kernel[(triton.cdiv(numel, BLOCK),)](gate, up, y, numel, BLOCK=BLOCK)
    return y


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_device("swiglu", grad, gate, up)
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    numel = gate.numel()
    if numel:
        _swiglu_backward_kernel[(triton.cdiv(numel, BLOCK),)](grad, gate, up, dgate, dup, numel, BLOCK=BLOCK)
    return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Differentiable SwiGLU through the ``anychip::swiglu`` op with this implementation."""
    from anychip.kernels.swiglu import swiglu_op

    return swiglu_op(gate, up, "triton")
