"""anychip: one PyTorch training step, on NVIDIA CUDA, AWS Trainium, TPU (JAX) or the CPU.

Public names only; everything heavy is imported on first use.
"""

from __future__ import annotations

from anychip.backends import Availability, BackendError, UnknownBackendError, backend, backends, reset
from anychip.optim import SGD, AdamW, Constant, WarmupCosine, WarmupLinear
from anychip.precision import policy
from anychip.step import LossFunctionError, NonFiniteLossError, StepOutput, TrainStep

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "Availability",
    "BackendError",
    "Constant",
    "LossFunctionError",
    "NonFiniteLossError",
    "SGD",
    "StepOutput",
    "TrainStep",
    "UnknownBackendError",
    "WarmupCosine",
    "WarmupLinear",
    "__version__",
    "backend",
    "backends",
    "policy",
    "reset",
]
