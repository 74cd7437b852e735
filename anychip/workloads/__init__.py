"""Built-in workloads: a model, a seeded synthetic data stream, the loss, and FLOPs per token.

``get("gpt-tiny")`` returns a :class:`Workload`; a user workload is ``"pkg.module:factory"``,
where ``factory()`` returns a :class:`Workload`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Callable, Iterator

from anychip.workloads import gpt, llama, mlp


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a benchmark or parity run needs to train something reproducibly.

    ``build(seed)`` returns a freshly initialised model (same seed, same weights everywhere);
    ``batch(step, batch_size, seq, seed)`` returns the batch of update ``step`` (a pure
    function of its arguments, so a resumed run sees the same data); ``loss_fn(model, batch)``
    is the scalar loss; ``flops_per_token(model, seq)`` the training FLOPs per token
    (6N + 12 L d T for transformers; 6N for the MLP).
    """

    name: str
    build: Callable
    batch: Callable
    loss_fn: Callable
    flops_per_token: Callable
    default_batch: int
    default_seq: int

    def __post_init__(self) -> None:
        if self.default_batch < 1 or self.default_seq < 1:
            raise ValueError(f"workload {self.name!r}: default batch and seq must be >= 1")

    def batches(self, batch_size: int | None = None, seq: int | None = None, seed: int = 0, start: int = 0) -> Iterator:
        step = start
        while True:
            yield self.batch(step, batch_size or self.default_batch, seq or self.default_seq, seed)
            step += 1


def _lm(name: str, module, preset: str, batch: int, seq: int) -> Workload:
    return Workload(
        name,
        build=lambda seed=0, **kw: module.build(preset, seed=seed, **kw),
        batch=lambda step, b, t, seed=0: module.synthetic_tokens(step, b, t, module.PRESETS[preset].vocab, seed),
        loss_fn=module.loss_fn,
        flops_per_token=module.flops_per_token,
        default_batch=batch,
        default_seq=seq,
    )


BUILTIN: dict[str, Workload] = {
    "mlp": Workload("mlp", mlp.build, mlp.batch, mlp.loss_fn, mlp.flops_per_token, default_batch=64, default_seq=1),
    "gpt-tiny": _lm("gpt-tiny", gpt, "tiny", 8, 64),
    "gpt-small": _lm("gpt-small", gpt, "small", 16, 1024),
    "llama-tiny": _lm("llama-tiny", llama, "tiny", 8, 64),
    "llama-small": _lm("llama-small", llama, "small", 16, 1024),
}


def get(name: str) -> Workload:
    """A built-in workload by name, or a user one as ``'pkg.module:factory'``."""
    if isinstance(name, Workload):
        return name
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load workload {name!r}: {exc}") from exc
        workload = factory()
        if not isinstance(workload, Workload):
            raise TypeError(f"workload factory {name!r} must return anychip.workloads.Workload, got {type(workload).__name__}")
        return workload
    close = difflib.get_close_matches(name, BUILTIN, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown workload {name!r}.{hint} Built-in: {', '.join(BUILTIN)}; or give 'pkg.module:factory'.")
