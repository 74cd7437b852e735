"""Built-in workloads: a model, a seeded synthetic data stream, the loss, and FLOPs per token.

``get("gpt-tiny")`` returns a :class:`Workload`; a user workload is ``"pkg.module:factory"``,
where ``factory()`` returns a :class:`Workload`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Callable, Iterator

from anychip.errors import InvalidArgumentError
from anychip.workloads import gpt, llama, mlp


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


def _lm(name: str, module, preset: str, batch: int, seq: int) -> Workload:
    c = module.PRESETS[preset]
    return Workload(
        name,
        build=lambda seed=0, **kw: module.build(preset, seed=seed, **kw),
        batch=lambda step, b, t, seed=0: module.synthetic_tokens(step, b, t, module.PRESETS[preset].vocab, seed),
        loss_fn=module.loss_fn,
        flops_per_token=module.flops_per_token,
        default_batch=batch,
        default_seq=seq,
        max_seq=c.ctx,
        batch_bytes_per_token=16,  # int64 inputs and targets
        # Every block keeps at least its q, k, v, attention output and two normalised inputs:
        # 8 x dim floats per token and layer (the MLP's hidden activations come on top).
        activation_bytes_per_token=4 * 8 * c.dim * c.layers,
    )


BUILTIN: dict[str, Workload] = {
    "mlp": Workload(
        "mlp", mlp.build, mlp.batch, mlp.loss_fn, mlp.flops_per_token, default_batch=64, default_seq=1, max_seq=1,
        batch_bytes_per_token=mlp.SAMPLE_BYTES, activation_bytes_per_token=mlp.ACTIVATION_BYTES,
    ),
    "gpt-tiny": _lm("gpt-tiny", gpt, "tiny", 8, 64),
    "gpt-small": _lm("gpt-small", gpt, "small", 16, 1024),
    "llama-tiny": _lm("llama-tiny", llama, "tiny", 8, 64),
    "llama-small": _lm("llama-small", llama, "small", 16, 1024),
}


def get(name: str) -> Workload:
    """A built-in workload by name, or a user one as ``'pkg.module:factory'``."""
    if isinstance(name, Workload):
        return name
    if not isinstance(name, str):
        raise InvalidArgumentError(f"workload must be a name such as 'gpt-tiny' or 'pkg.module:factory', got {type(name).__name__}")
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        return _from_factory(name)
    close = difflib.get_close_matches(name, BUILTIN, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise InvalidArgumentError(f"unknown workload {name!r}.{hint} Built-in: {', '.join(BUILTIN)}; or give 'pkg.module:factory'.")


def _from_factory(name: str) -> Workload:
    """``'pkg.module:factory'``: import the module, call ``factory()``, check what it returned."""
    module_name, _, attr = name.partition(":")
    if not module_name.strip() or not attr.strip():
        raise InvalidArgumentError(f"workload {name!r}: expected 'pkg.module:factory', with both parts")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot load workload {name!r}: {exc}") from exc
    if not callable(factory):
        raise InvalidArgumentError(f"workload {name!r} is a {type(factory).__name__}, not a factory: name a function that returns "
                                   "anychip.workloads.Workload")
    try:
        workload = factory()
    except Exception as exc:  # noqa: BLE001 - whatever the user's factory raises is reported as its failure
        raise InvalidArgumentError(f"workload factory {name!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(workload, Workload):
        raise InvalidArgumentError(
            f"workload factory {name!r} returned {type(workload).__name__} {workload!r:.60}; a workload factory takes no "
            "arguments and must return anychip.workloads.Workload"
        )
    return workload
