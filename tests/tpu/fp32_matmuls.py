"""pytest plugin for the conformance run on `tpu`: float32 matmuls in float32.

A TPU runs float32 matrix multiplications in bfloat16 passes unless told otherwise; the conformance
suite compares fp32 training with the CPU loop to 1e-5, which only full float32 can meet. TorchTPU
takes `torch.set_float32_matmul_precision` once its device is loaded, so the backend starts first.
"""

from __future__ import annotations


def pytest_configure(config):
    import torch

    import anychip as ac

    ac.backend("tpu")  # loads TorchTPU's device and its precision setting
    torch.set_float32_matmul_precision("highest")
    ac.reset()
