"""Precision policies, one name each:

- ``fp32``: parameters, optimizer state and compute in float32.
- ``bf16``: float32 master parameters and optimizer state; forward and backward compute in
  bfloat16 (autocast on torch backends, a cast of the parameters inside the step on JAX).
- ``bf16-pure``: parameters, gradients and optimizer state all in bfloat16 (half the memory,
  no master copy; what most TPU/Trainium recipes call "pure bf16").
"""

from __future__ import annotations

import dataclasses
import difflib


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: str  # dtype of the stored parameters and optimizer state
    compute_dtype: str  # dtype of matmuls/activations in forward and backward

    @property
    def autocast(self) -> bool:
        """True when compute runs in a lower precision than the stored parameters."""
        return self.compute_dtype != self.param_dtype

    def torch_dtype(self, which: str = "param"):
        import torch

        return getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[getattr(self, f"{which}_dtype")])


POLICIES = {
    "fp32": Policy("fp32", "fp32", "fp32"),
    "bf16": Policy("bf16", "fp32", "bf16"),
    "bf16-pure": Policy("bf16-pure", "bf16", "bf16"),
}


def policy(name: str | Policy) -> Policy:
    """The policy called ``name``; a clear error listing the valid names otherwise."""
    if isinstance(name, Policy):
        return name
    if name in POLICIES:
        return POLICIES[name]
    close = difflib.get_close_matches(str(name), POLICIES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown precision {name!r}.{hint} Choose one of: {', '.join(POLICIES)}.")
