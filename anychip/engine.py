"""What every engine shares, stdlib only: the step specification, the step's output, the
engine contract, and the pending non-finite check.

An *engine* is what a backend builds from a :class:`StepSpec` (``backend.make_engine(spec)``):
``TorchEngine`` for the torch backends, ``JaxEngine`` for ``jax:*``. :class:`anychip.step.TrainStep`
talks to it only through :class:`Engine`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

from anychip.errors import NonFiniteLossError

NONFINITE_POLICIES = ("raise", "skip", "ignore")
PARALLEL_MODES = (None, "ddp", "fsdp", "auto")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything a backend needs to build a training step; validated by ``TrainStep``."""

    model: Any
    loss_fn: Callable
    optimizer: Any  # an anychip.optim.OptimizerSpec, or the user's torch.optim.Optimizer
    policy: Any  # an anychip.precision.Policy
    max_grad_norm: float | None = None
    accumulate: int = 1
    compile: bool | None = None
    on_nonfinite: str = "raise"
    parallel: str | None = None
    strict_shapes: bool = False
    kernels: str = "auto"
    split_batches: bool = True
    lr_scheduler: Any = None  # a torch LRScheduler on ``optimizer``, or callable(update) -> lr factor


class StepOutput:
    """Result of one update. ``loss`` and ``grad_norm`` are device values read lazily.
    ``lrs`` holds each parameter group's learning rate for this update, ``lr`` the first's;
    engines pass either one float or the per-group sequence as ``lr``."""

    __slots__ = ("step", "lr", "lrs", "tokens", "skipped", "_loss", "_grad_norm", "_read")

    def __init__(self, step: int, loss, grad_norm, lr, tokens: int, skipped: bool = False):
        self.lrs = tuple(float(v) for v in lr) if isinstance(lr, (tuple, list)) else (float(lr),)
        self.step, self.lr, self.tokens, self.skipped = step, self.lrs[0], tokens, skipped
        self._loss, self._grad_norm, self._read = loss, grad_norm, {}

    def _host(self, key: str, value) -> float:
        if key not in self._read:
            self._read[key] = float(value)  # the one device->host sync, on first read
        return self._read[key]

    @property
    def loss(self) -> float:
        return self._host("loss", self._loss)

    @property
    def grad_norm(self) -> float:
        return self._host("grad_norm", self._grad_norm)

    @property
    def loss_tensor(self):
        """The loss as the backend produced it (no synchronisation)."""
        return self._loss

    def __repr__(self) -> str:
        return (
            f"StepOutput(step={self.step}, loss={self.loss:.6g}, grad_norm={self.grad_norm:.4g}, "
            f"lr={self.lr:.4g}, tokens={self.tokens}{', skipped=True' if self.skipped else ''})"
        )


def nonfinite_error(step: int, loss, norm) -> NonFiniteLossError:
    """The one message for an update refused because its loss or gradient norm was not finite."""
    return NonFiniteLossError(
        f"step {step}: loss {float(loss)}, grad norm {float(norm)} is not finite; parameters were not "
        "updated (TrainStep(on_nonfinite='skip') skips such updates instead)"
    )


@dataclasses.dataclass
class PendingCheck:
    """A finiteness flag that is read one step late, so the host never waits on the device for
    it: ``flag`` is host-readable with ``bool()`` once ``wait()`` (if any) returned. The update
    it belongs to was already withheld on the device when it was not finite."""

    flag: Any
    step: int
    loss: Any
    norm: Any
    wait: Callable[[], None] | None = None

    def failed(self) -> bool:
        if self.wait is not None:
            self.wait()  # waits for that step only, not for work queued after it
        return not bool(self.flag)

    def error(self) -> NonFiniteLossError:
        return nonfinite_error(self.step, self.loss, self.norm)


@runtime_checkable
class Engine(Protocol):
    """The contract between ``TrainStep`` and a backend's step implementation."""

    world: int  # processes taking part in one update (1 outside torchrun / jax.distributed)
    batch_parts: int  # the batch must split into batch_parts x accumulate equal parts
    updates: int  # updates applied so far
    param_names: list[str]  # trainable parameters, in the order of the model's named_parameters()

    @property
    def model(self) -> Any:
        """The torch module with the current weights."""

    def step(self, batch, tokens: int) -> StepOutput:
        """One optimizer update on ``batch``."""

    def state_dict(self, sharded: bool = False) -> dict:
        """``{"step", "model", "optimizer": {"slots"}}``: CPU tensors by name, backend-neutral;
        ``sharded=True``: a tensor this process holds only a shard of stays a DTensor (nothing is
        gathered; every process passes its own shards to a checkpoint written in parallel);
        plus ``"rng": {name: uint8 tensor}`` for a generator the engine itself owns (the JAX
        key; the global and device generators are the backend's). ``load_state_dict`` keeps
        its generator when ``"rng"`` is absent, and derives one from torch's when it is present
        without the engine's own entry (a state from another backend)."""

    def load_state_dict(self, state: dict) -> None: ...

    def raise_pending_nonfinite(self) -> None:
        """Settle a deferred non-finite check now (raises NonFiniteLossError if it failed)."""

    def synchronize(self) -> None:
        """Wait until the last step's work on the device is done."""
