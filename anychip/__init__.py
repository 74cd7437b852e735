"""anychip: one PyTorch training step, on NVIDIA CUDA, AWS Trainium, TPU (JAX) or the CPU.

Public names only; everything heavy is imported on first use.

``ac.list_backends()`` lists the backends; ``ac.backends()`` is the same function under its
first name. As an attribute of ``anychip`` it shadows the ``anychip.backends`` package, so
reach the registry with from-imports (``from anychip.backends import register``).
"""

from __future__ import annotations

from anychip.backends import Availability, backend, backends, list_backends, reset
from anychip.checkpoint import SaveHandle, load, save, verify
from anychip.distributed import init_distributed, is_main_process, shutdown_distributed
from anychip.errors import (
    AnychipError,
    BackendError,
    CheckpointBusyError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointVersionError,
    DistributedError,
    InvalidArgumentError,
    LossFunctionError,
    NonFiniteLossError,
    UnknownBackendError,
    UnsupportedOptimizerError,
)
from anychip.metrics_log import MetricsLogger
from anychip.optim import SGD, AdamW, Constant, WarmupCosine, WarmupLinear
from anychip.precision import policy
from anychip.engine import StepOutput
from anychip.step import TrainStep
from anychip.version import __version__

__all__ = [
    "AdamW",
    "AnychipError",
    "Availability",
    "BackendError",
    "CheckpointBusyError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointVersionError",
    "Constant",
    "DistributedError",
    "InvalidArgumentError",
    "LossFunctionError",
    "MetricsLogger",
    "NonFiniteLossError",
    "SGD",
    "StepOutput",
    "SaveHandle",
    "TrainStep",
    "UnknownBackendError",
    "UnsupportedOptimizerError",
    "WarmupCosine",
    "WarmupLinear",
    "__version__",
    "backend",
    "backends",
    "init_distributed",
    "is_main_process",
    "list_backends",
    "load",
    "policy",
    "reset",
    "save",
    "shutdown_distributed",
    "verify",
]
