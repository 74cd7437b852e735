"""torch.nn modules built on anychip's kernel ops, drop-in for the plain PyTorch layers.

Each module's parameters and state_dict keys are those of the usual PyTorch / Llama layer it
replaces (``RMSNorm.weight``; ``SwiGLU.gate_proj/up_proj/down_proj``;
``LinearCrossEntropyHead.weight`` as in ``nn.Linear(d, V, bias=False)``), so checkpoints load
either way. Every module takes:

* ``kernels``: "auto" (default: best implementation for the backend, or the reference when
  ``ANYCHIP_KERNELS=reference``), "reference", or an implementation name such as "triton"
  (raises when it cannot run there); see ``anychip.kernels.selection``.
* ``backend``: a backend name ("cpu", "cuda", "jax:tpu", ...). None (default) means the
  default a TrainStep sets (``anychip.kernels.defaults(backend=...)`` or
  ``set_default_backend``), else the input tensor's device.
"""

from __future__ import annotations

import torch
from torch import nn

from anychip.kernels.table import IMPLS, MODES
from anychip.kernels.attention import attention
from anychip.kernels.linear_cross_entropy import linear_cross_entropy
from anychip.kernels.rms_norm import rms_norm
from anychip.kernels.rotary import rotary, rotary_tables
from anychip.kernels.swiglu import swiglu

__all__ = ["Attention", "LinearCrossEntropyHead", "RMSNorm", "Rotary", "SwiGLU"]


def _check_kernels(op: str, kernels: str) -> str:
    if kernels not in MODES and (op, kernels) not in IMPLS:
        names = ", ".join(name for (o, name) in IMPLS if o == op)
        raise ValueError(f"kernels for {op} must be auto, reference or one of: {names}; got {kernels!r}")
    return kernels


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x**2, -1) + eps) * weight over the last dim (torch.nn.RMSNorm's keys)."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        kernels: str = "auto",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.kernels = _check_kernels("rms_norm", kernels)
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, kernels=self.kernels, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, kernels={self.kernels!r}"


class SwiGLU(nn.Module):
    """Llama's MLP: down_proj(silu(gate_proj(x)) * up_proj(x)); keys as in HF LlamaMLP."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        bias: bool = False,
        *,
        kernels: str = "auto",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.kernels = _check_kernels("swiglu", kernels)
        self.backend = backend
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = swiglu(self.gate_proj(x), self.up_proj(x), kernels=self.kernels, backend=self.backend)
        return self.down_proj(hidden)


class LinearCrossEntropyHead(nn.Module):
    """LM head + cross-entropy that never materialises the logits (``weight`` [V, d], like
    ``nn.Linear(d, V, bias=False)``; tie it with ``head.weight = embedding.weight``).

    ``forward(hidden [..., d], targets [...]) -> loss``; ``logits(hidden)`` for inference.
    """

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
        kernels: str = "auto",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.kernels = _check_kernels("linear_cross_entropy", kernels)
        self.backend = backend
        # Same initialisation as nn.Linear(dim, vocab_size, bias=False).
        self.weight = nn.Linear(dim, vocab_size, bias=False, device=device, dtype=dtype).weight

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(
            hidden, self.weight, targets, self.ignore_index, self.reduction,
            chunk_size=self.chunk_size, kernels=self.kernels, backend=self.backend,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight)

    def extra_repr(self) -> str:
        vocab, dim = self.weight.shape
        return f"{dim}, {vocab}, reduction={self.reduction!r}, kernels={self.kernels!r}"


class Rotary(nn.Module):
    """Rotary embedding of q, k [B, H, T, D] (rotate-half), positions 0..T-1.

    cos/sin tables [max_seq_len, D/2] are float32 non-persistent buffers (not in the
    state_dict, like HF's inv_freq). ``model.to(torch.bfloat16)`` casts them too, as it does
    every floating buffer; the kernels then read bf16 angles.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        base: float = 10000.0,
        *,
        kernels: str = "auto",
        backend: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.kernels = _check_kernels("rotary", kernels)
        self.backend = backend
        cos, sin = rotary_tables(max_seq_len, head_dim, base, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[2]
        if T > self.cos.shape[0]:
            raise ValueError(f"Rotary: sequence length {T} exceeds max_seq_len {self.cos.shape[0]}")
        return rotary(q, k, self.cos[:T], self.sin[:T], kernels=self.kernels, backend=self.backend)


class Attention(nn.Module):
    """softmax(q k^T * scale) v, q [B, Hq, T, D], k/v [B, Hk, S, D]; no parameters.

    "auto" runs torch's SDPA (flash) on CUDA/CPU and jax.nn.dot_product_attention on JAX.
    """

    def __init__(
        self, causal: bool = True, scale: float | None = None, *, kernels: str = "auto", backend: str | None = None
    ) -> None:
        super().__init__()
        self.causal = causal
        self.scale = scale
        self.kernels = _check_kernels("attention", kernels)
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.causal, self.scale, kernels=self.kernels, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, kernels={self.kernels!r}"
