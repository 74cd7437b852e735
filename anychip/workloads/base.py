"""The :class:`Workload` record, in a module of its own so that the workload modules
(``hf`` among them) and the package's look-up can all import it without a circle."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a benchmark or parity run needs to train something reproducibly.

    ``build(seed)`` returns a freshly initialised model (same seed, same weights everywhere);
    ``batch(step, batch_size, seq, seed)`` returns the batch of update ``step`` (a pure
    function of its arguments, so a resumed run sees the same data); ``loss_fn(model, batch)``
    is the scalar loss; ``flops_per_token(model, seq)`` the training FLOPs per token
    (6N + 12 L d T for transformers; 6N for the MLP).

    What the CLI checks a requested batch against, before building anything: ``max_seq``, the
    longest sequence the model takes (its context length; 1 for a model without a sequence
    dimension; None: no limit); ``batch_bytes_per_token``, the host bytes of one token of a
    batch; ``activation_bytes_per_token``, a lower bound on the bytes of activations one token
    keeps for backward in float32 (0: unknown).
    """

    name: str
    build: Callable
    batch: Callable
    loss_fn: Callable
    flops_per_token: Callable
    default_batch: int
    default_seq: int
    max_seq: int | None = None
    batch_bytes_per_token: int = 0
    activation_bytes_per_token: int = 0

    def __post_init__(self) -> None:
        if self.default_batch < 1 or self.default_seq < 1:
            raise ValueError(f"workload {self.name!r}: default batch and seq must be >= 1")
        if self.max_seq is not None and not self.max_seq >= self.default_seq:
            raise ValueError(f"workload {self.name!r}: max_seq {self.max_seq} is below default_seq {self.default_seq}")
        if self.batch_bytes_per_token < 0 or self.activation_bytes_per_token < 0:
            raise ValueError(f"workload {self.name!r}: bytes per token must be >= 0")

    def batches(self, batch_size: int | None = None, seq: int | None = None, seed: int = 0, start: int = 0) -> Iterator:
        step = start
        while True:
            yield self.batch(step, batch_size or self.default_batch, seq or self.default_seq, seed)
            step += 1
