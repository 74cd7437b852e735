"""Recompilation control, shared by every compiled backend (torch.compile, jax.jit, torch_xla).

Each of them compiles one program per input signature (shapes and dtypes), so a change of
signature after warm-up means a new compile: seconds on a GPU, minutes on Trainium. The watch
below compares each batch's signature with the warm-up one, says exactly which input changed,
and raises instead when ``strict_shapes=True``. ``pad_to_bucket`` keeps sequence lengths to a
few fixed sizes so the number of compiled programs stays bounded.
"""

from __future__ import annotations

import logging

log = logging.getLogger("anychip")


class RecompileError(RuntimeError):
    """An input signature changed after warm-up while ``strict_shapes=True``."""


def signature(leaves) -> tuple:
    # Raw torch.Size / dtype objects: hashable and cheap; turned into text only by describe().
    return tuple((path, t.shape, t.dtype) for path, t in leaves)


class ShapeWatch:
    """Remembers every input signature seen; a new one after the first is a recompile."""

    def __init__(self, strict: bool, backend_name: str):
        self.strict, self.backend_name = strict, backend_name
        self.seen: list[tuple] = []

    def check(self, leaves) -> None:
        sig = signature(leaves)
        if sig in self.seen:
            return
        if self.seen:
            changes = describe(self.seen[0], sig)
            if self.strict:
                raise RecompileError(
                    f"{changes}: the step would be recompiled on {self.backend_name!r} and strict_shapes=True; "
                    "keep shapes fixed or pad them, e.g. anychip.recompile.pad_to_bucket(batch, buckets=(128, 256, 512))"
                )
            log.warning("anychip: recompiling the step on %r: %s", self.backend_name, changes)
        self.seen.append(sig)


def describe(old: tuple, new: tuple) -> str:
    """'batch[0] shape (8, 64) -> (8, 32)' for every input that differs."""
    def text(sig):
        return [(path, tuple(shape), str(dtype).replace("torch.", "")) for path, shape, dtype in sig]

    old, new = text(old), text(new)
    before = {path: (shape, dtype) for path, shape, dtype in old}
    parts = []
    for path, shape, dtype in new:
        if path not in before:
            parts.append(f"new input {path} {shape} {dtype}")
            continue
        oshape, odtype = before[path]
        if oshape != shape:
            parts.append(f"{path} shape {oshape} -> {shape}")
        if odtype != dtype:
            parts.append(f"{path} dtype {odtype} -> {dtype}")
    parts += [f"input {p} is gone" for p in before if p not in {q for q, _, _ in new}]
    return "; ".join(parts) or "input structure changed"


def pad_to_bucket(batch, buckets=(128, 256, 512, 1024, 2048), *, dim: int = 1, pad_value: int = 0, ignore_index: int = -100):
    """Pad every tensor of an ``(inputs, targets)`` language-model batch along ``dim`` up to the
    smallest bucket that fits. Inputs are padded with ``pad_value``; targets (the second element)
    with ``ignore_index`` so padding adds nothing to the loss."""
    import torch.nn.functional as F

    buckets = sorted(buckets)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("pad_to_bucket expects an (inputs, targets) pair")
    length = batch[0].shape[dim]
    target = next((b for b in buckets if b >= length), None)
    if target is None:
        raise ValueError(f"sequence length {length} is longer than the largest bucket {buckets[-1]}; add a bucket")
    if target == length:
        return batch

    def pad(t, value):
        widths = [0, 0] * (t.ndim - dim - 1) + [0, target - length]
        return F.pad(t, widths, value=value)

    return type(batch)((pad(batch[0], pad_value), pad(batch[1], ignore_index)))
