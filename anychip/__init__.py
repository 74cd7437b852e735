"""anychip: one PyTorch training step, on NVIDIA CUDA, AWS Trainium, TPU (JAX) or the CPU.

Public names only; everything heavy is imported on first use.

Note: ``anychip.backends`` below is the *function* listing backends (the public API in
DESIGN.md); it shadows the ``anychip.backends`` package as an attribute, so reach the
registry with from-imports (``from anychip.backends import register``), which always work.
"""

from __future__ import annotations

from anychip.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointVersionError,
    load,
    save,
)
from anychip.distributed import DistributedError, init_distributed, is_main_process
from anychip.backends import Availability, BackendError, UnknownBackendError, backend, backends, reset
from anychip.optim import SGD, AdamW, Constant, WarmupCosine, WarmupLinear
from anychip.precision import policy
from anychip.step import LossFunctionError, NonFiniteLossError, StepOutput, TrainStep

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "Availability",
    "BackendError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointVersionError",
    "Constant",
    "DistributedError",
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
    "init_distributed",
    "is_main_process",
    "load",
    "policy",
    "reset",
    "save",
]
