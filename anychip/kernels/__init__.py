"""Kernels: every op's implementations, and which one runs on which backend.

Every op lives in ``anychip/kernels/<op>/``: ``reference.py`` is plain PyTorch and *is* the
specification; every other file there is one implementation with the same public names
(``triton.py`` for CUDA, ``jax.py`` / ``pallas.py`` for the JAX backend, ``torch_chunked.py``,
``sdpa.py``). The modules here each do one job:

* ``table``: ``Impl`` records and ``TABLE``, where each implementation runs, by kernel family;
* ``scope``: which backend a call runs on, and ``kernel_scope`` (a ContextVar) a TrainStep sets;
* ``select``: ``select``/``available``, the one policy that reads the table;
* ``torchax``: the op overrides that take the model through torchax on the JAX backend.

The public entries live in the op packages (``anychip.kernels.rms_norm.rms_norm``, ...):
re-exporting one here under its package's name would leave two objects under one name. The
op packages never bind ``triton`` or ``jax`` as globals: importing the sibling implementation
file (``anychip.kernels.<op>.triton``) sets that attribute on the package and would shadow it.
Importing this package imports neither triton nor jax.
"""

from __future__ import annotations

from anychip.errors import KernelUnavailableError
from anychip.kernels.scope import (
    ENV_VAR,
    backend_of,
    default_backend,
    default_kernels,
    defaults,
    family_of,
    kernel_scope,
    known_backends,
    resolve_backend,
    set_default_backend,
    set_default_kernels,
)
from anychip.kernels.selection import KernelStatus, available, load, reset, select, select_for_call, torch_module, why_not
from anychip.kernels.table import FAMILIES, IMPLS, MODES, OPS, TABLE, Impl

# Importing the op packages registers their torch.library custom ops (anychip::<op>).
import anychip.kernels.attention  # noqa: E402, I001
import anychip.kernels.linear_cross_entropy  # noqa: E402
import anychip.kernels.rms_norm  # noqa: E402
import anychip.kernels.rotary  # noqa: E402
import anychip.kernels.swiglu  # noqa: E402, F401
from anychip.kernels.torchax import environment, install_jax_overrides, jax_overrides  # noqa: E402

__all__ = [
    "ENV_VAR",
    "FAMILIES",
    "IMPLS",
    "MODES",
    "OPS",
    "TABLE",
    "Impl",
    "KernelStatus",
    "KernelUnavailableError",
    "available",
    "backend_of",
    "default_backend",
    "default_kernels",
    "defaults",
    "environment",
    "family_of",
    "install_jax_overrides",
    "jax_overrides",
    "kernel_scope",
    "known_backends",
    "load",
    "reset",
    "resolve_backend",
    "select",
    "select_for_call",
    "set_default_backend",
    "set_default_kernels",
    "torch_module",
    "why_not",
]
