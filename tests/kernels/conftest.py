"""Kernel tests configure themselves.

Without a CUDA GPU, Triton kernels run in Triton's interpreter on CPU tensors. triton reads
TRITON_INTERPRET when a kernel is decorated, i.e. when anychip.kernels.<op>.triton is first
imported, so it is set here, before any test module imports a kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_kernel_state(monkeypatch):
    """No ANYCHIP_KERNELS from the caller's shell, no default backend or mode, fresh probes."""
    import anychip.kernels as kernels

    monkeypatch.delenv("ANYCHIP_KERNELS", raising=False)
    previous = kernels.set_default_backend(None), kernels.set_default_kernels("auto")
    kernels.reset()
    yield
    kernels.set_default_backend(previous[0])
    kernels.set_default_kernels(previous[1])
    kernels.reset()
