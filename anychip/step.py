"""`TrainStep`: one optimizer update of a PyTorch model, on whichever backend was chosen.

The user writes ``loss_fn(model, batch) -> scalar tensor`` once. ``TrainStep`` validates every
argument up front (bad input fails before any work), selects the backend, and hands a
:class:`anychip.engine.StepSpec` to it, which builds an *engine* (``TorchEngine`` for the torch
backends, ``JaxEngine`` for ``jax:*``). One call ``step(batch)`` is one optimizer update:

* the batch is moved to the device and split into ``accumulate`` equal micro-batches along
  dim 0 (so ``accumulate=4`` on a batch of 32 equals one update on those 32 samples while
  holding only 8 in activation memory);
* forward + loss under the precision policy, backward, global gradient norm, optional
  clipping to ``max_grad_norm``, a non-finite check, optimizer update, schedule update.

The returned :class:`anychip.engine.StepOutput` keeps the loss on the device; it is copied to
the host only when read, so a loop that does not print every step never waits for the device.
``logger=`` (an :class:`anychip.metrics_log.MetricsLogger`) is handed each step's values one step
late, for the same reason.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

from anychip import distributed, user_optimizer, validate
from anychip.backends import backend as select
from anychip.backends.contract import Backend
from anychip.batch import check_batch, count_tokens
from anychip.engine import NONFINITE_POLICIES, PARALLEL_MODES, StepOutput, StepSpec
from anychip.errors import InvalidArgumentError, LossFunctionError, NonFiniteLossError
from anychip.metrics_log import LateRecord
from anychip.optim import AdamW
from anychip.precision import policy
from anychip.recompile import ShapeWatch

__all__ = ["LossFunctionError", "NonFiniteLossError", "StepOutput", "StepSpec", "TrainStep"]

_warned_copies = False  # the N-copies warning is given once per process


def resolve_parallel(backend, parallel: str | None) -> str | None:
    """``parallel="auto"``: DDP when torchrun launched several processes of a torch backend,
    the device mesh (data parallel) on a jax backend with several devices, else one process.
    Without ``parallel=``, torchrun's N processes would train N copies: warned once."""
    global _warned_copies
    reg = getattr(backend, "registration", None)
    jax_like = reg is not None and reg.engine == "jax"
    launched = distributed.launched_world_size()
    if parallel == "auto":
        if jax_like:
            return "ddp" if len(backend.devices) > 1 or backend.processes > 1 else None
        return "ddp" if launched is not None and launched > 1 else None
    if parallel is None and not jax_like and launched is not None and launched > 1 and not _warned_copies:
        _warned_copies = True
        warnings.warn(
            f"torchrun started {launched} processes but TrainStep(parallel=None): each process trains its own copy of "
            "the model; pass parallel='ddp' (or 'auto') to train one model over them", stacklevel=3,
        )
    return parallel


class TrainStep:
    """One portable training step: ``TrainStep(model, loss_fn, optimizer=ac.AdamW(...))(batch)``.

    Arguments are checked here, before any device work; each error says what was wrong and
    how to fix it.

    ``logger``: an object with ``log(record: dict)``, such as ``ac.MetricsLogger("runs/")``. Step
    N's record (step, loss, grad_norm, lr, lrs, step_time_s, tokens, tokens_per_s, skipped, time)
    is logged during call N+1, once step N+1 is queued, so logging never waits for the device;
    the last step's on ``synchronize()`` or the logger's ``flush()`` / ``close()``. ``step_time_s``
    is the host's view: from the start of one call to the start of the next.
    """

    def __init__(
        self,
        model,
        loss_fn: Callable,
        optimizer=None,
        *,
        lr_scheduler=None,
        backend=None,
        precision: str = "fp32",
        max_grad_norm: float | None = None,
        accumulate: int = 1,
        compile: bool | None = None,
        on_nonfinite: str = "raise",
        parallel: str | None = None,
        strict_shapes: bool = False,
        kernels: str = "auto",
        split_batches: bool = True,
        logger=None,
    ):
        import torch

        own = "TrainStep"
        if not isinstance(model, torch.nn.Module):
            raise validate.fail("model", model, "a torch.nn.Module", "e.g. TrainStep(torch.nn.Linear(4, 2), loss_fn)", owner=own)
        if not callable(loss_fn):
            raise validate.fail("loss_fn", loss_fn, "callable as loss_fn(model, batch) -> scalar tensor",
                                "e.g. lambda m, b: F.mse_loss(m(b[0]), b[1])", owner=own)
        # Every plain argument is checked before the optimizer and scheduler are looked at:
        # resolve() may build a LambdaLR on the user's optimizer, which writes its groups.
        max_grad_norm = validate.real("max_grad_norm", max_grad_norm, above=0, allow_none=True, owner=own,
                                      fix="e.g. max_grad_norm=1.0, or None for no clipping")
        accumulate = validate.integer("accumulate", accumulate, min=1, owner=own, fix="e.g. accumulate=4 (micro-batches per update)")
        compile = validate.flag("compile", compile, allow_none=True, owner=own)
        strict_shapes = validate.flag("strict_shapes", strict_shapes, owner=own)
        split_batches = validate.flag("split_batches", split_batches, owner=own)
        on_nonfinite = validate.choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES, owner=own)
        parallel = validate.choice("parallel", parallel, PARALLEL_MODES, owner=own)
        kernels = validate.choice("kernels", kernels, ("auto", "reference"), owner=own)
        if logger is not None and (isinstance(logger, type) or not callable(getattr(logger, "log", None))):
            raise validate.fail("logger", logger, "an object with a log(record: dict) method, or None",
                                "e.g. logger=ac.MetricsLogger('runs/')", owner=own)
        LateRecord.check_open(logger)
        pol = policy(precision)
        if backend is not None and not isinstance(backend, (str, Backend)):
            raise validate.fail("backend", backend, "a backend name such as 'cpu' or 'jax:tpu', an ac.backend(...) or None",
                                "see ac.list_backends()", owner=own)
        if not any(p.requires_grad for p in model.parameters()):
            raise InvalidArgumentError("TrainStep: model has no trainable parameters (none with requires_grad=True); "
                                       "unfreeze some with p.requires_grad_(True)")
        optimizer = AdamW() if optimizer is None else optimizer
        # A spec (ac.AdamW(...)) or the user's torch.optim optimizer over model's parameters;
        # lr_scheduler: a torch LRScheduler on it, or callable(update) -> lr factor.
        optimizer, lr_scheduler = user_optimizer.resolve(optimizer, lr_scheduler, model)
        self.backend = backend if isinstance(backend, Backend) else select(backend)
        parallel = resolve_parallel(self.backend, parallel)
        self.spec = StepSpec(
            model, loss_fn, optimizer, pol, max_grad_norm, accumulate, compile, on_nonfinite, parallel, strict_shapes, kernels,
            split_batches, lr_scheduler,
        )
        self.engine = self.backend.make_engine(self.spec)  # an anychip.engine.Engine
        self._shapes = ShapeWatch(strict_shapes, self.backend.name)
        self._processes = self.engine.batch_parts
        self._late = LateRecord(logger) if logger is not None else None

    @property
    def model(self):
        """The model as trained (on the device for torch backends; synced back for JAX)."""
        return self.engine.model

    @property
    def step_count(self) -> int:
        return self.engine.updates

    def __call__(self, batch) -> StepOutput:
        if self._late is not None:
            return self._logged(batch)
        leaves = check_batch(batch, self.spec.accumulate, self._processes)
        self._shapes.check(leaves)
        return self.engine.step(batch, count_tokens(leaves))

    def _logged(self, batch) -> StepOutput:
        started, wall = time.perf_counter(), time.time()
        LateRecord.check_open(self._late.logger)
        leaves = check_batch(batch, self.spec.accumulate, self._processes)
        self._shapes.check(leaves)
        out = self.engine.step(batch, count_tokens(leaves))
        self._late.push(out, started, wall)  # logs the step before this one, whose device work is done
        return out

    def state_dict(self, *, sharded: bool = False) -> dict:
        """Backend-neutral training state: CPU tensors keyed by parameter and slot names.
        ``sharded=True`` keeps FSDP's DTensors as each rank's shard instead of gathering them."""
        # Asked of the engine only when wanted: an engine of a plug-in may take no argument.
        return self.engine.state_dict(sharded=True) if sharded else self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_state_dict(state)

    def synchronize(self) -> None:
        """Wait until the last step's work on the device is done (timing, benchmarks); then the
        logger, if any, gets the last step's record."""
        self.engine.synchronize()
        if self._late is not None:
            self._late.settle()
