"""Every public exception of anychip, in one leaf module that imports nothing of anychip.

Each layer raises from here, so the engines, the step, the checkpoint code and the CLI agree on
one type per failure without importing each other.
"""

from __future__ import annotations


class AnychipError(Exception):
    """Base class of every exception anychip raises on purpose: the CLI reports any of them as
    one line and exit status 2 (a traceback only with ``--debug``)."""


class InvalidArgumentError(AnychipError, ValueError, TypeError):
    """A public argument of the wrong type or out of range, refused before any work starts.

    A ValueError and a TypeError both, so code that catches either keeps working."""


class MissingDependencyError(AnychipError, ImportError):
    """An optional package a feature needs is not installed; the message gives the pip command."""


class BackendError(AnychipError, RuntimeError):
    """A backend was asked for by name and cannot be used; the message says why and how to fix it."""


class UnknownBackendError(BackendError, ValueError):
    """A backend name that no registration knows."""


class NonFiniteLossError(AnychipError, FloatingPointError):
    """The loss or the gradient norm was NaN/inf; the parameters were left as they were."""


class LossFunctionError(AnychipError, RuntimeError):
    """``loss_fn`` raised, or returned something that is not a scalar floating-point tensor."""


class UnsupportedOpError(AnychipError, NotImplementedError):
    """The model calls a torch op that the backend cannot lower (torchax has no JAX lowering)."""


class UnsupportedOptimizerError(AnychipError, ValueError):
    """A ``torch.optim`` optimizer, or one of its options, that a backend cannot reproduce."""


class DistributedError(AnychipError, RuntimeError):
    """Something between processes failed: a launch that is missing, a peer that died or hung."""


class KernelUnavailableError(AnychipError, RuntimeError):
    """An explicitly requested kernel implementation cannot run on the requested backend."""


class CheckpointError(AnychipError):
    """Base class of every checkpoint problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No complete checkpoint where one was asked for."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A save would replace an existing checkpoint; checkpoints are never overwritten."""


class CheckpointBusyError(CheckpointError):
    """Another process is saving to the same checkpoint directory; the message names its pid."""


class CheckpointCorruptError(CheckpointError):
    """A file is missing, truncated, altered, unparsable, or not safetensors/JSON."""


class CheckpointVersionError(CheckpointError):
    """The checkpoint was written in a newer major format than this anychip reads."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the step: parameter names, shapes, dtypes or optimizer differ.

    ``missing`` / ``unexpected`` / ``renamed`` / ``reshaped`` / ``retyped`` hold the details
    the message lists.
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), renamed=(), reshaped=(), retyped=(), optimizer=()):
        super().__init__(message)
        self.missing, self.unexpected, self.renamed = list(missing), list(unexpected), list(renamed)
        self.reshaped, self.retyped, self.optimizer = list(reshaped), list(retyped), list(optimizer)
